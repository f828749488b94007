"""API key format and hashing: `clsk_live_<32 hex>` (test keys `clsk_test_<32 hex>`), stored only as HMAC-SHA256
with a server secret."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

KEY_PREFIX = "clsk_live_"
# A test key's prefix (as Stripe's sk_test_): a human tells at a glance that a key is free and rate-capped, and a
# secret scanner can rank a leaked test key lower. The database's api_keys.mode is what the platform acts on.
TEST_KEY_PREFIX = "clsk_test_"
KEY_MODES = ("live", "test")
_KEY_PATTERN = re.compile(r"^clsk_(live|test)_[0-9a-f]{32}$")


def generate_api_key(mode: str = "live") -> str:
    return (TEST_KEY_PREFIX if mode == "test" else KEY_PREFIX) + secrets.token_hex(16)


def looks_like_api_key(candidate: str) -> bool:
    return bool(_KEY_PATTERN.match(candidate))


def hash_api_key(secret: bytes, api_key: str) -> str:
    return hmac.new(secret, api_key.encode(), hashlib.sha256).hexdigest()


def display_prefix(api_key: str) -> str:
    """What humans see in listings: enough to recognise a key, useless to an attacker."""
    return api_key[: len(KEY_PREFIX) + 6]


# Admin tokens (the admin API and the developer dashboard): another prefix, so a token pasted where an API key
# belongs (or the reverse) is refused by its shape and never looked up; hashed with the same secret.
ADMIN_TOKEN_PREFIX = "clat_"
_ADMIN_TOKEN_PATTERN = re.compile(r"^clat_[0-9a-f]{40}$")


def generate_admin_token() -> str:
    return ADMIN_TOKEN_PREFIX + secrets.token_hex(20)


def looks_like_admin_token(candidate: str) -> bool:
    return bool(_ADMIN_TOKEN_PATTERN.match(candidate))


def admin_token_prefix(token: str) -> str:
    return token[: len(ADMIN_TOKEN_PREFIX) + 6]
