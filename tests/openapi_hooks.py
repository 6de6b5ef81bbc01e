"""Schemathesis hooks for tests/openapi_fuzz.sh (loaded through SCHEMATHESIS_HOOKS).

`POST /webhooks/email/{tenant_id}` takes a raw email as `message/rfc822`, a media type
schemathesis has no serializer for: generated values are sent as the message's bytes.
"""

import schemathesis


@schemathesis.serializer("message/rfc822")
def rfc822(ctx, value):
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")
