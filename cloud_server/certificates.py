"""The cloud's TLS certificate, key and client CA, reloadable without a restart (SIGHUP, like the tokens file).

gRPC's dynamic server credentials ask a fetcher for a new certificate configuration before every TLS handshake;
`ServerCertificates.reload` reads and checks the files and leaves the result for the fetcher to hand over once.
New connections then use the new files; connections already open keep theirs. A file that is missing, not PEM or
does not match its key keeps the configuration in force and logs why, so a half-copied renewal never takes the
cloud off the air. Whether clients must present a certificate is fixed at start-up (gRPC's credentials hold it):
a cloud started with --tls-ca reloads the CA file, one started without it does not start asking.
"""
from __future__ import annotations

import logging
import threading

import grpc

from picospec.shared.connection import ConnectionSettingsError, ServerTlsFiles, server_tls_files

log = logging.getLogger("picospec.cloud")


def certificate_configuration(files: ServerTlsFiles) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([files.pair], root_certificates=files.client_ca)


class ServerCertificates:
    """The TLS files in force, from --tls-cert, --tls-key and --tls-ca (ConnectionSettingsError at start-up for
    files that cannot work)."""

    def __init__(self, tls_cert: str, tls_key: str, tls_ca: str) -> None:
        self.paths = (tls_cert, tls_key, tls_ca)
        files = server_tls_files(tls_cert, tls_key, tls_ca)
        if files is None:
            raise ConnectionSettingsError("no TLS files to serve (--tls-cert and --tls-key)")
        self.initial = files
        self.mutual = files.client_ca is not None
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()  # the fetcher runs on gRPC's threads, reload on the event loop's

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(certificate_configuration(self.initial), self._fetch,
                                                   require_client_authentication=self.mutual)

    def reload(self) -> bool:
        """Read the files again; the next handshake uses them. On any error keep the ones in force and say why."""
        tls_cert, tls_key, tls_ca = self.paths
        try:
            files = server_tls_files(tls_cert, tls_key, tls_ca if self.mutual else "")
        except ConnectionSettingsError as e:
            log.error("TLS certificate not reloaded, the one in force stays: %s", e)
            return False
        with self._lock:
            self._pending = certificate_configuration(files)
        log.info("TLS certificate reloaded from %s%s: new connections use it", tls_cert,
                 f" (client CA {tls_ca})" if self.mutual else "")
        return True

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's question before each handshake: a configuration to switch to, once, or None to keep the current."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending
