"""imapproxy: an IMAP/POP3 proxy. Importing the package must not import a reactor."""

__version__ = "0.1.0"
