"""services/common/auth.py without a network: keys from text and files, caller ids, the header's
forms, and that a secret is never kept or echoed."""

from __future__ import annotations

import pytest

from services.common.auth import KeyRing
from services.common.errors import Unauthenticated


def test_keys_from_text_and_a_file_with_names(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# operators\nops:sk-ops\n\nsk-anonymous-key\n")
    keys = KeyRing.from_sources("alice:sk-a, bob:sk-b", str(path))
    assert keys.authenticate("Bearer sk-a") == "alice"
    assert keys.authenticate("bearer   sk-b ") == "bob"
    assert keys.authenticate("Bearer sk-ops") == "ops"
    assert keys.authenticate("Bearer sk-anonymous-key").startswith("key-")
    assert KeyRing.from_sources(None, None) is None and KeyRing.from_sources("", None) is None


@pytest.mark.parametrize("header, message", [
    (None, "missing credentials"), ("", "missing credentials"), ("sk-a", "missing credentials"),
    ("Basic sk-a", "missing credentials"), ("Bearer ", "missing credentials"),
    ("Bearer sk-A", "not valid"), ("Bearer sk-a2", "not valid"),
])
def test_anything_but_a_known_bearer_key_is_unauthenticated(header, message):
    keys = KeyRing.from_sources("alice:sk-a")
    with pytest.raises(Unauthenticated, match=message) as err:
        keys.authenticate(header)
    assert "sk-" not in str(err.value)


def test_only_digests_are_kept():
    keys = KeyRing.from_sources("alice:sk-secret-value")
    assert "sk-secret-value" not in repr(vars(keys))


def test_bad_key_sources_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read the key file"):
        KeyRing.from_sources(None, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="an API key is empty"):
        KeyRing.from_sources("alice:")
