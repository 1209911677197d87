"""twistd plugin: `twistd imapproxy --config FILE`."""

from twisted.application.service import ServiceMaker

imapproxy = ServiceMaker(
    "imapproxy", "imapproxy.service", "IMAP/POP3 proxy with directory routing", "imapproxy"
)
