"""Which CA the command-line clients trust: ``fdship submit|jobs|job|hosts|schedule``, ``fdship-tui``.

Where it sits: between the clients' flags and :func:`fdship.httpclient.configure_tls`.
The center and the daemons take their CA from their config file (``tls_ca``);
the clients have no config file of their own, so they take it from
``--tls-ca FILE``, else ``$FDSHIP_TLS_CA`` (``fdship-tui`` also from the
``tls_ca`` of a ``--config`` file), else nothing: https:// servers are then
verified against the system's trust store.

The file is checked before any request goes out, so a typo in the path, a file
this user cannot read or a file that holds no certificate (a private key, a
certificate request) stops the command with a sentence naming the file and
where it came from, instead of surfacing later as a vague TLS failure.
"""

from __future__ import annotations

import os
import ssl
import stat

from fdship.errors import ConfigError

ENV = "FDSHIP_TLS_CA"
_SNIFF = 64 * 1024  # enough of a PEM file to tell a key or a request from a certificate


def resolve_ca(flag: str | None, config_value: str = "",
               config_origin: str = "") -> tuple[str, str]:
    """(CA file, where it came from): the flag beats $FDSHIP_TLS_CA beats a config file.

    ``("", "")`` when none is given: verify with the system's trust store.
    """
    if flag:
        return flag, "--tls-ca"
    env = os.environ.get(ENV, "")
    if env:
        return env, "$" + ENV
    if config_value:
        return config_value, config_origin or "tls_ca"
    return "", ""


def check_ca_file(path: str, origin: str = "--tls-ca") -> None:
    """Raise ConfigError unless ``path`` is a readable PEM file holding a CA certificate."""
    what = f"{origin} {path}"
    todo = ("give the PEM file of the CA that signed the servers' certificates "
            "(it starts with -----BEGIN CERTIFICATE-----)")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{what}: no such file; {todo}") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot be read ({e.strerror}); {todo}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} is a directory, not a file; {todo}")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} is not a regular file; {todo}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF)
    except OSError as e:
        raise ConfigError(f"{what}: cannot be read by this user ({e.strerror}); check its "
                          f"permissions, or {todo}") from None
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as e:
        # ssl.SSLError before OSError: it is a subclass.  Say what the file is
        # when it is a common mix-up, so the fix is obvious.
        if b"PRIVATE KEY-----" in head:
            found = "it holds a private key, not a certificate"
        elif b"CERTIFICATE REQUEST-----" in head:
            found = "it holds a certificate request, not a certificate"
        elif b"-----BEGIN CERTIFICATE-----" in head:
            found = f"its certificate is damaged ({e.reason or e})"
        elif not head.strip():
            found = "it is empty"
        else:
            found = "it holds no PEM certificate"
        raise ConfigError(f"{what} is not a CA certificate: {found}; {todo}") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot be read ({e.strerror}); {todo}") from None


def use_ca(flag: str | None, config_value: str = "", config_origin: str = "") -> tuple[str, str]:
    """Resolve and check the CA file, then make this process's HTTPS calls verify with it.

    Returns (CA file, origin), both empty when the system's trust store is used.
    """
    from fdship.httpclient import configure_tls  # imports tornado: only when a client runs

    path, origin = resolve_ca(flag, config_value, config_origin)
    if path:
        check_ca_file(path, origin)
    configure_tls(path)
    return path, origin


# fdship.httpclient ends a certificate failure with a hint written for the
# daemons' config (tls_ca); a command line has a better one, so it is replaced.
_CONFIG_HINT = "; the server's certificate is not signed by a trusted CA"


def explain_tls_failure(message: str, path: str, origin: str) -> str:
    """``message`` of a failed request, with what to do when TLS was the reason.

    ``path`` and ``origin`` are what :func:`use_ca` returned: the note says
    which CA the certificate was checked against.  Other messages come back
    as they are.
    """
    if "CERTIFICATE_VERIFY_FAILED" in message or "certificate verify failed" in message:
        base = message.split(_CONFIG_HINT, 1)[0]
        if "mismatch" in message:  # "Hostname mismatch", "IP address mismatch"
            return (f"{base}; the certificate was not issued for the host in the URL: use the "
                    "name or address it was issued for (its subjectAltName)")
        if "expired" in message:
            return f"{base}; the server's certificate has expired: renew it"
        ca = (f"the CA in {path} ({origin})" if path else
              "any CA of the system's trust store (no --tls-ca or $FDSHIP_TLS_CA given)")
        return (f"{base}; the server's certificate is not signed by {ca}: pass --tls-ca FILE "
                "with the CA certificate that signed it")
    if "WRONG_VERSION_NUMBER" in message or "record layer failure" in message:
        return message  # fdship.httpclient already says: use an http:// URL
    if "Timeout during TLS handshake" in message:
        # A plain HTTP server waits for a request line that a TLS hello never ends.
        return f"{message}; if the server serves plain HTTP, use an http:// URL"
    if "cannot reach http://" in message and ("reset" in message or "closed" in message):
        return f"{message} (if the server serves HTTPS, use an https:// URL)"
    return message
