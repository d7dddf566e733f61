"""filterc: the filterd client, a drop-in replacement for SpamAssassin's ``spamc`` 4.0.1.

It reads a message on standard input, sends it to a spamd-protocol daemon (filterd, or a real
spamd) and prints what the chosen mode asks for, with spamc's options, output bytes and exit
codes, so that procmail/maildrop recipes and MTA transports written for spamc work unchanged::

    filterc [options] [-e command [args]] < message

The behaviour follows spamc's own sources (``spamc.c``, ``libspamc.c``, ``getopt.c``) and was
checked against Debian's spamc 4.0.1 (tests/test_client_unit.py runs both side by side):

* Option parsing is spamc's own getopt: ONE option letter per argument (``-cx`` is ``-c``), a
  value is always the next argument (``-d127.0.0.1`` is an error) and never starts with ``-``,
  long options are ``--name value`` or ``--name=value``, parsing stops at the first word that is
  not an option. Options from ``/etc/spamassassin/spamc.conf`` (or ``-F file``) come first.
* Safe fallback: when the daemon cannot be reached or answers badly, the original message is
  printed unchanged and the exit code is 0 (``-c``/``-R``/``-r`` print ``0/0``, ``-y`` an empty
  line), unless ``-x``. ``-X`` with ``-x`` turns EX_UNAVAILABLE (69) into EX_TEMPFAIL (75).
  ``-L``/``-K`` failures exit with the error code; a failed ``-C`` passes the message through.
* Connecting: each ``-d`` host (all its addresses) in turn, ``--connect-retries`` rounds (3) with
  ``--retry-sleep`` (1 s) between rounds, none after a refused host that has a successor; ``-x``
  keeps only the first host, as spamc does.
* Scores are parsed the way libspamc does it (in C ``float``), so ``4.95`` prints as ``4.9``.

Where filterc deliberately differs from spamc:

* Log lines always go to standard error (``filterc: ...``); spamc uses syslog unless ``-l``.
* ``-z`` works (Debian's spamc is built without zlib and rejects it with exit 64).
* A failure to read standard input, or to write the output, exits EX_IOERR (74) even in
  safe-fallback mode: spamc exits 0 there, and the MTA would take the mail as delivered.
* ``-B`` input with a DATA line but no final dot passes through as it came; spamc prints its
  half-unstuffed buffer (``..x`` becomes ``.x`` and the tail is shifted).
* An option missing its value at the end of the line is a usage error (64) also when a config
  file is read; spamc crashes there (it reads past its argument list).
* The ``-t`` timeout also bounds sending the request (spamc can block there forever).
* ``-h``/``-V`` name filterc; ``-S`` uses Python's ``ssl`` (no certificate check unless
  ``--ssl-ca-file``/``--ssl-ca-path``, no host name check, as spamc).

Accepted and ignored, as in spamc: ``-f`` (old "safe fallback", now the default), ``-l`` (filterc
always logs to stderr), ``-F`` inside the option list (the file is read before parsing), the short
forms ``-0 n``, ``-1 n`` and ``-2``.
"""

from __future__ import annotations

# _socket is the C module behind `socket`: `import socket` costs ~8 ms more (enum, selectors),
# a quarter of filterc's start time, for nothing the few calls used here need.
import _socket
import os
import sys

__all__ = ["SpamdAnswer", "SpamdError", "main", "spamd_request"]

EX_OK = 0
EX_USAGE = 64
EX_DATAERR = 65
EX_NOINPUT = 66
EX_NOHOST = 68
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_OSERR = 71
EX_IOERR = 74
EX_TEMPFAIL = 75
EX_PROTOCOL = 76
EX_NOPERM = 77
EX_CONFIG = 78
EX_NOTSPAM = 0
EX_ISSPAM = 1
EX_TOOBIG = 866  # libspamc's "message too big"; exit(866) is status 98

CONFIG_FILE = "/etc/spamassassin/spamc.conf"
CONFIG_MAX_LINE_SIZE = 8192
COMBO_ARGV_SIZE = 24
SPAMC_MAX_MESSAGE_LEN = 256 * 1024 * 1024
DEFAULT_MAX_SIZE = 500 * 1024
EXPANSION_ALLOWANCE = 16384
PROTOCOL_VERSION = b"SPAMC/1.5"
# libspamc reads the response head into an 8192-byte buffer less 4 bytes of breathing room; a
# line may fill all of it but the last byte.
LINE_BUFSIZ = 8192 - 4
MAX_LINE = LINE_BUFSIZ - 1

# flags, as in libspamc.h
F_BSMTP = 1 << 0
F_USE_INET6 = 1 << 31
F_USE_INET4 = 1 << 30
F_CHECK_ONLY = 1 << 29
F_SAFE_FALLBACK = 1 << 28
F_USE_SSL = 1 << 27
F_REPORT = 1 << 26
F_REPORT_IFSPAM = 1 << 25
F_SYMBOLS = 1 << 24
F_RANDOMIZE_HOSTS = 1 << 23
F_LOG_TO_STDERR = 1 << 22
F_LEARN = 1 << 21
F_REPORT_MSG = 1 << 20
F_PING = 1 << 19
F_USE_ZLIB = 1 << 16
F_HEADERS = 1 << 15
F_UNAVAIL_TEMPFAIL = 1 << 13
F_CLIENT_SSL_CERT = 1 << 12

MESSAGE_NONE, MESSAGE_ERROR, MESSAGE_RAW, MESSAGE_BSMTP = range(4)
TRANSPORT_LOCALHOST, TRANSPORT_TCP, TRANSPORT_UNIX = range(1, 4)

SET_LOCAL, SET_REMOTE, REMOVE_LOCAL, REMOVE_REMOTE = 1, 2, 4, 8
CLASS_SPAM, CLASS_HAM = 1, 2

# spamc's getopt string; a letter followed by ':' takes the next argument as its value
OPTSTRING = "-BcrR46d:e:fyp:n:t:s:u:L:C:xXzSHU:ElhVKF:0:1:2"
NO_ARG, REQUIRED_ARG, OPTIONAL_ARG = range(3)
LONG_OPTIONS: tuple[tuple[str, int, int | str], ...] = (
    ("dest", REQUIRED_ARG, "d"),
    ("randomize", NO_ARG, "H"),
    ("port", REQUIRED_ARG, "p"),
    ("ssl", OPTIONAL_ARG, "S"),
    ("ssl-cert", OPTIONAL_ARG, 5),
    ("ssl-key", OPTIONAL_ARG, 6),
    ("ssl-ca-file", OPTIONAL_ARG, 7),
    ("ssl-ca-path", OPTIONAL_ARG, 8),
    ("socket", REQUIRED_ARG, "U"),
    ("config", REQUIRED_ARG, "F"),
    ("timeout", REQUIRED_ARG, "t"),
    ("connect-timeout", REQUIRED_ARG, "n"),
    ("connect-retries", REQUIRED_ARG, 0),
    ("retry-sleep", REQUIRED_ARG, 1),
    ("filter-retries", REQUIRED_ARG, 3),
    ("filter-retry-sleep", REQUIRED_ARG, 4),
    ("max-size", REQUIRED_ARG, "s"),
    ("username", REQUIRED_ARG, "u"),
    ("learntype", REQUIRED_ARG, "L"),
    ("reporttype", REQUIRED_ARG, "C"),
    ("bsmtp", NO_ARG, "B"),
    ("check", NO_ARG, "c"),
    ("tests", NO_ARG, "y"),
    ("full-spam", NO_ARG, "r"),
    ("full", NO_ARG, "R"),
    ("headers", NO_ARG, 2),
    ("exitcode", NO_ARG, "E"),
    ("no-safe-fallback", NO_ARG, "x"),
    ("unavailable-tempfail", NO_ARG, "X"),
    ("log-to-stderr", NO_ARG, "l"),
    ("pipe-to", REQUIRED_ARG, "e"),
    ("help", NO_ARG, "h"),
    ("version", NO_ARG, "V"),
    ("compress", NO_ARG, "z"),
)

USAGE_TEXT = """\
Usage: filterc [options] [-e command [args]] < message

Options:
  -d, --dest host[,host2]
                      Specify one or more hosts to connect to.
                      [default: localhost]
  -H , --randomize    Randomize IP addresses for the looked-up
                      hostname.
  -p, --port port     Specify port for connection to spamd.
                      [default: 783]
  -S, --ssl           Use SSL to talk to spamd.
  --ssl-cert cert     Authenticate using SSL client certificate.
  --ssl-key key       Specify an SSL client key PEM file.
  --ssl-ca-file file  Specify the location of the CA PEM file.
  --ssl-ca-path path  Specify a directory containin CA files.
  -U, --socket path   Connect to spamd via UNIX domain sockets.
  -F, --config path   Use this configuration file.
  -t, --timeout timeout
                      Timeout in seconds for communications to
                      spamd. [default: 600]
  -n, --connect-timeout timeout
                      Timeout in seconds when opening a connection to
                      spamd. [default: 600]
  --filter-retries retries
                      Retry filtering this many times if the spamd
                      process fails (usually times out) [default: 1]
  --filter-retry-sleep sleep
                      Sleep for this time between failed filter
                      attempts, in seconds [default: 1]
  --connect-retries retries
                      Try connecting to spamd tcp socket this many times
                      [default: 3]
  --retry-sleep sleep Sleep for this time between attempts to
                      connect to spamd, in seconds [default: 1]
  -s, --max-size size Specify maximum message size, in bytes.
                      [default: 500k]
  -u, --username username
                      User for spamd to process this message under.
                      [default: current user]
  -L, --learntype learntype
                      Learn message as spam, ham or forget to
                      forget or unlearn the message.
  -C, --reporttype reporttype
                      Report message to collaborative filtering
                      databases.  Report type should be 'report' for
                      spam or 'revoke' for ham.
  -B, --bsmtp         Assume input is a single BSMTP-formatted
                      message.
  -c, --check         Just print the summary line and set an exit
                      code.
  -y, --tests         Just print the names of the tests hit.
  -r, --full-spam     Print full report for messages identified as
                      spam.
  -R, --full          Print full report for all messages.
  --headers           Rewrite only the message headers.
  -E, --exitcode      Filter as normal, and set an exit code.
  -x, --no-safe-fallback
                      Don't fallback safely.
  -X, --unavailable-tempfail
                      When using -x, turn 'unavailable' error into
                      'tempfail'. This may be useful for an MTAs
                      to defer emails with a temporary SMTP error
                      instead of bouncing with a permanent SMTP
                      error.
  -l, --log-to-stderr Log errors and warnings to stderr.
  -e, --pipe-to command [args]
                      Pipe the output to the given command instead
                      of stdout. This must be the last option.
  -h, --help          Print this help message and exit.
  -V, --version       Print spamc version and exit.
  -K                  Keepalive check of spamd.
  -z                  Compress mail message sent to spamd.
  -f                  (Now default, ignored.)
  -4                  Use IPv4 only for connecting to server.
  -6                  Use IPv6 only for connecting to server.

"""

_SPACE = b" \t\n\v\f\r"
# the getaddrinfo errors libspamc takes for "no such host"; others (but EAI_AGAIN) are EX_OSERR
_PERMANENT_EAI = frozenset(
    getattr(_socket, name, 0)
    for name in (
        "EAI_FAMILY",
        "EAI_SOCKTYPE",
        "EAI_BADFLAGS",
        "EAI_NONAME",
        "EAI_SERVICE",
        "EAI_SYSTEM",
        "EAI_MEMORY",
        "EAI_FAIL",
    )
)
_AddrInfo = tuple[int, int, int, str, tuple[str, int] | tuple[str, int, int, int] | tuple[int, bytes]]
_LONG_MAX = (1 << 63) - 1
_LONG_MIN = -(1 << 63)


# --------------------------------------------------------------------------- C semantics


def _c_int(value: int) -> int:
    """Wrap to a 32-bit C int, as storing a long into an int does."""
    return (value + (1 << 31)) % (1 << 32) - (1 << 31)


def _strtol(data: bytes) -> tuple[int, int]:
    """C strtol(data, &end, 10): the value (clamped to long) and the index where parsing stopped.

    With no digits the end index is 0, as strtol sets endptr to the start.
    """
    n = len(data)
    i = 0
    while i < n and data[i] in _SPACE:
        i += 1
    negative = False
    if i < n and data[i] in b"+-":
        negative = data[i] == 0x2D
        i += 1
    start = i
    while i < n and 0x30 <= data[i] <= 0x39:
        i += 1
    if i == start:
        return 0, 0
    value = int(data[start:i])
    value = -value if negative else value
    return max(_LONG_MIN, min(_LONG_MAX, value)), i


def _atoi(text: str) -> int:
    """C atoi: leading number of ``text`` or 0, wrapped to int."""
    return _c_int(_strtol(os.fsencode(text))[0])


def _f32(value: float) -> float:
    """Round to a C float (IEEE single), as libspamc keeps scores in ``float``."""
    from array import array

    return array("f", [value])[0]


def _locale_safe_float(buf: bytes) -> float:
    """libspamc's _locale_safe_string_to_float, float rounding included (4.95 -> 4.9499998)."""
    ret_l, end = _strtol(buf)
    ret = _f32(float(ret_l))
    if end >= len(buf) or buf[end] != 0x2E:  # no '.' where the number stopped
        return ret
    cp = buf[end + 1 :]
    postdot = _f32(float(_strtol(cp)[0]))
    if -0.00001 <= postdot <= 0.00001:
        return ret
    divider = 1
    for _ in cp:  # one power of ten per character after the dot, digits or not
        divider = _c_int(divider * 10)
    fraction = _f32(postdot / _f32(float(divider)))
    return _f32(ret - fraction) if buf[:1] == b"-" else _f32(ret + fraction)


def _scanf(fmt: bytes, data: bytes) -> list[bytes | int]:
    """The part of C sscanf libspamc uses: literals, white space, ``%Ns``, ``%*s`` and ``%d``.

    Returns the conversions stored before the first mismatch, so ``len()`` is sscanf's count.
    """
    data = data.split(b"\0", 1)[0]  # C strings end at NUL
    out: list[bytes | int] = []
    i = f = 0
    n = len(data)
    while f < len(fmt):
        c = fmt[f]
        if c in _SPACE:
            while i < n and data[i] in _SPACE:
                i += 1
            f += 1
            continue
        if c != 0x25:  # an ordinary character must match exactly
            if i < n and data[i] == c:
                i += 1
                f += 1
                continue
            return out
        f += 1
        suppress = fmt[f] == 0x2A
        f += suppress
        width = 0
        while 0x30 <= fmt[f] <= 0x39:
            width = width * 10 + fmt[f] - 0x30
            f += 1
        conversion = fmt[f]
        f += 1
        while i < n and data[i] in _SPACE:
            i += 1
        if i >= n:
            return out
        if conversion == 0x73:  # 's'
            start = i
            limit = min(n, i + width) if width else n
            while i < limit and data[i] not in _SPACE:
                i += 1
            if not suppress:
                out.append(data[start:i])
        else:  # 'd'
            value, used = _strtol(data[i:])
            if used == 0:
                return out
            i += used
            out.append(_c_int(value))
    return out


# --------------------------------------------------------------------------- state


class _Fail(Exception):
    """A libspamc failure code, raised inside the protocol functions."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Options:
    """What spamc's read_args fills in."""

    __slots__ = (
        "flags",
        "use_exit_code",
        "exec_argv",
        "timeout",
        "connect_timeout",
        "max_size",
        "username",
        "extratype",
        "transport_type",
        "hostname",
        "socketpath",
        "port",
        "connect_retries",
        "retry_sleep",
        "filter_retries",
        "filter_retry_sleep",
        "ssl_cert_file",
        "ssl_key_file",
        "ssl_ca_file",
        "ssl_ca_path",
    )

    def __init__(self) -> None:
        self.flags = F_SAFE_FALLBACK
        self.use_exit_code = False
        self.exec_argv: list[str] | None = None
        self.timeout: float = 600
        self.connect_timeout: float = 0
        self.max_size = DEFAULT_MAX_SIZE
        self.username: str | None = None
        self.extratype = 0
        self.transport_type = TRANSPORT_LOCALHOST
        self.hostname = ""
        self.socketpath: str | None = None
        self.port = 783
        self.connect_retries = 0
        self.retry_sleep = -1
        self.filter_retries = 0
        self.filter_retry_sleep = 0
        self.ssl_cert_file: str | None = None
        self.ssl_key_file: str | None = None
        self.ssl_ca_file: str | None = None
        self.ssl_ca_path: str | None = None


class _Message:
    """libspamc's struct message: the input as read, and what goes out."""

    __slots__ = (
        "type",
        "max_len",
        "raw",
        "scanned",
        "pre",
        "msg",
        "post",
        "out",
        "is_spam",
        "score",
        "threshold",
        "content_length",
        "alloced",
        "answer_headers",
    )

    def __init__(self, max_len: int) -> None:
        self.type = MESSAGE_NONE
        self.max_len = max_len
        self.raw = b""
        self.scanned = b""  # raw as libspamc's in-place BSMTP unstuffing leaves it
        self.pre = b""
        self.msg = b""
        self.post = b""
        self.out = b""
        self.answer_headers: bytes | None = None  # HEADERS: the daemon's header block, as it came
        self.is_spam = EX_NOHOST  # spamc's default when the daemon is never reached
        self.score = 0.0
        self.threshold = 0.0
        self.content_length = -1
        self.alloced = 0


class _Connection:
    """A connected socket with the response reading libspamc does."""

    __slots__ = ("sock", "buffer", "eof")

    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.eof = False

    def readline(self) -> bytes:
        """One response line without its ``\\n`` and an optional ``\\r`` before it."""
        while True:
            nl = self.buffer.find(b"\n", 0, MAX_LINE)
            if nl >= 0:
                line = self.buffer[:nl]
                self.buffer = self.buffer[nl + 1 :]
                return line[:-1] if line.endswith(b"\r") else line
            if len(self.buffer) >= MAX_LINE:
                raise _Fail(EX_TOOBIG)
            try:
                chunk = self.sock.recv(8192)
            except OSError:  # timeouts included
                raise _Fail(EX_IOERR) from None
            if not chunk:
                raise _Fail(EX_IOERR)
            self.buffer += chunk

    def read_body(self, limit: int) -> bytes | None:
        """Read to EOF, at most ``limit`` bytes; None on a read error (as full_read's -1)."""
        parts = [self.buffer[:limit]]
        got = len(parts[0])
        self.buffer = b""
        while got < limit:
            try:
                chunk = self.sock.recv(min(65536, limit - got))
            except OSError:
                return None
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def close(self) -> None:
        self.sock.close()


# --------------------------------------------------------------------------- the client


class _Client:
    """spamc's main(), libspamc's message_* functions and its transport, for one run."""

    def __init__(self, prog: str = "filterc") -> None:
        self.prog = prog  # the name log lines start with
        self.opts = _Options()
        self.hosts: list[list[_AddrInfo]] = []  # getaddrinfo's answers, one list per -d host
        self.stdio: list[bytes] = []  # what spamc prints with printf: flushed at exit
        self.out_fd = -1
        self.message: _Message | None = None
        self.output_written = False
        self.write_failed = False
        self.stdin_failed = False

    # ---- output

    def log(self, text: str) -> None:
        _stderr(f"{self.prog}: {text}")

    def printf(self, text: str) -> None:
        self.stdio.append(os.fsencode(text))

    def flush_stdio(self) -> None:
        data = b"".join(self.stdio)
        self.stdio.clear()
        if data:
            self.write_all(1, data)

    def write_all(self, fd: int, data: bytes | memoryview) -> bool:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
                self.output_written = True
            except InterruptedError:
                continue
            except OSError:
                self.write_failed = True
                return False
        return True

    def output_fd(self) -> int:
        """spamc's get_output_fd: stdout, or a pipe to the ``-e`` command.

        As in spamc, the process that was started becomes the command (so the caller waits for
        the command and gets its exit status) and a forked child feeds it the output.
        """
        if self.out_fd != -1:
            return self.out_fd
        exec_argv = self.opts.exec_argv
        if exec_argv is None:
            self.out_fd = 1
            return 1
        try:
            read_end, write_end = os.pipe()
        except OSError as e:
            self.log(f"pipe creation failed: {e.strerror}")
            raise SystemExit(EX_OSERR) from None
        try:
            pid = os.fork()
        except OSError as e:
            self.log(f"fork failed: {e.strerror}")
            raise SystemExit(EX_OSERR) from None
        if pid == 0:
            os.close(read_end)
            self.out_fd = write_end
            return write_end
        os.close(write_end)
        try:
            os.dup2(read_end, 0)
        except OSError as e:
            self.log(f"redirection of stdin failed: {e.strerror}")
            os._exit(EX_OSERR)
        os.close(read_end)
        try:
            os.execv(exec_argv[0], exec_argv)
        except (OSError, ValueError) as e:
            self.log(f"exec failed: {getattr(e, 'strerror', None) or e}")
        os._exit(EX_OSERR)

    def print_version(self) -> None:
        from filterd import __version__

        self.printf(f"filterc version {__version__} (SpamAssassin Client 4.0.1 compatible)\n")
        try:
            import ssl

            self.printf(f"  with SSL support ({ssl.OPENSSL_VERSION})\n")
        except ImportError:
            pass

    def print_usage(self) -> None:
        self.print_version()
        self.printf("\n" + USAGE_TEXT)

    # ---- options

    def combine_args(self, config_file: str | None, argv: list[str]) -> list[str] | int:
        """spamc's combine_args: the config file's words, then the command line."""
        user_defined = config_file is not None
        path = config_file if config_file is not None else CONFIG_FILE
        try:
            with open(path, "rb") as f:
                text = f.read()
        except OSError:
            if user_defined:
                _stderr(f"Failed to open config file: {path}")
                return EX_CONFIG
            return EX_NOINPUT
        combo = [argv[0]]
        lines = text.split(b"\n")
        for index, line in enumerate(lines):
            last = index == len(lines) - 1
            if last and not line:
                break
            if line[:1] == b"#" or line == b"":
                continue
            if last or len(line) + 1 > CONFIG_MAX_LINE_SIZE - 1:
                if last and len(line) < CONFIG_MAX_LINE_SIZE - 1:
                    _stderr(f"Line not terminated with a newline in {path}")
                else:
                    _stderr(f"Exceeded max line size ({CONFIG_MAX_LINE_SIZE - 2}) in {path}")
                return EX_CONFIG
            for token in line.split(b" "):
                if not token:
                    continue
                if len(combo) >= COMBO_ARGV_SIZE:
                    _stderr(f"Exceeded max number of arguments ({COMBO_ARGV_SIZE}) in {path}")
                    return EX_CONFIG
                combo.append(os.fsdecode(token))
        for arg in argv[1:]:
            if len(combo) >= COMBO_ARGV_SIZE:
                _stderr(f"Exceeded max number of arguments ({COMBO_ARGV_SIZE}) in {path}")
                return EX_CONFIG
            combo.append(arg)
        return combo

    def read_args(self, argv: list[str]) -> int:
        """spamc's read_args over spamc's getopt_long. EX_TEMPFAIL means "done, exit 0"."""
        o = self.opts
        ret = EX_OK
        optind = 1
        argc = len(argv)
        while True:
            opt, optarg, optind = self.getopt(argv, optind)
            if opt == -1:
                break
            if opt == "B":
                o.flags |= F_BSMTP
            elif opt == "c":
                o.flags |= F_CHECK_ONLY
            elif opt == "d":
                o.transport_type = TRANSPORT_TCP
                o.hostname = optarg or ""
            elif opt == "e":
                o.exec_argv = argv[optind - 1 : argc]
                return EX_OK  # the rest of the line is the command: no further checks
            elif opt == "K":
                o.flags |= F_PING
            elif opt == "l":
                o.flags |= F_LOG_TO_STDERR
            elif opt == "H":
                o.flags |= F_RANDOMIZE_HOSTS
            elif opt == "p":
                o.port = _atoi(optarg or "") & 0xFFFF
            elif opt == "r":
                o.flags |= F_REPORT_IFSPAM
            elif opt == "E":
                o.use_exit_code = True
            elif opt == "R":
                o.flags |= F_REPORT
            elif opt == "s":
                o.max_size = _atoi(optarg or "")
            elif opt == "S":
                o.flags |= F_USE_SSL
                if optarg is not None:
                    self.log("Explicit specification of an SSL/TLS version no longer supported.")
                    ret = EX_USAGE
            elif opt == "t":
                o.timeout = _atoi(optarg or "")
                if not o.connect_timeout:
                    o.connect_timeout = o.timeout
            elif opt == "n":
                o.connect_timeout = _atoi(optarg or "")
            elif opt == "u":
                o.username = optarg
            elif opt == "L":
                o.flags |= F_LEARN
                if optarg in ("spam", "ham", "forget"):
                    o.extratype = ("spam", "ham", "forget").index(optarg)
                else:
                    self.log("Please specify a legal learn type")
                    ret = EX_USAGE
            elif opt == "C":
                o.flags |= F_REPORT_MSG
                if optarg in ("report", "revoke"):
                    o.extratype = ("report", "revoke").index(optarg)
                else:
                    self.log("Please specify a legal report type")
                    ret = EX_USAGE
            elif opt == "U":
                o.transport_type = TRANSPORT_UNIX
                o.socketpath = optarg
            elif opt == "x":
                o.flags &= ~F_SAFE_FALLBACK
            elif opt == "X":
                if not o.flags & F_SAFE_FALLBACK:
                    o.flags |= F_UNAVAIL_TEMPFAIL
                else:
                    self.log("This option is only valid if -x is set first")
            elif opt == "y":
                o.flags |= F_SYMBOLS
            elif opt == "?":
                self.log("invalid usage")
                self.print_usage()
                return EX_USAGE
            elif opt == "h":
                self.print_usage()
                return EX_TEMPFAIL if ret == EX_OK else ret
            elif opt == "V":
                self.print_version()
                return EX_TEMPFAIL
            elif opt == "z":
                o.flags |= F_USE_ZLIB
            elif opt == "4":
                o.flags = (o.flags | F_USE_INET4) & ~F_USE_INET6
            elif opt == "6":
                o.flags = (o.flags | F_USE_INET6) & ~F_USE_INET4
            elif opt == 0:
                o.connect_retries = _atoi(optarg or "")
            elif opt == 1:
                o.retry_sleep = _atoi(optarg or "")
            elif opt == 2:
                o.flags |= F_HEADERS
            elif opt == 3:
                o.filter_retries = _atoi(optarg or "")
            elif opt == 4:
                o.filter_retry_sleep = _atoi(optarg or "")
            elif opt in (5, 6):
                o.flags |= F_CLIENT_SSL_CERT
                if opt == 5:
                    o.ssl_cert_file = optarg
                else:
                    o.ssl_key_file = optarg
            elif opt == 7:
                o.ssl_ca_file = optarg
            elif opt == 8:
                o.ssl_ca_path = optarg
            # 'f' (obsolete), 'F' (read before parsing) and the short '0', '1', '2': no effect

        if o.flags & F_CLIENT_SSL_CERT and not (o.ssl_cert_file and o.ssl_key_file):
            self.log("--ssl-cert and --ssl-key must be used together")
            ret = EX_USAGE
        if o.max_size > SPAMC_MAX_MESSAGE_LEN:
            self.log(f"-s parameter is beyond max of {SPAMC_MAX_MESSAGE_LEN}")
            ret = EX_USAGE
        if not o.flags & (F_USE_INET4 | F_USE_INET6):
            o.flags |= F_USE_INET4 | F_USE_INET6
        if o.flags & F_LEARN:
            for flag, what in (
                (F_CHECK_ONLY, "check only"),
                (F_PING, "ping"),
                (F_REPORT_IFSPAM, "report if spam"),
                (F_REPORT, "report"),
                (F_SYMBOLS, "symbols"),
                (F_REPORT_MSG, "reporting to collaborative filtering databases"),
            ):
                if o.flags & flag:
                    self.log(f"Learning excludes {what}")
                    ret = EX_USAGE
        return ret

    def getopt(self, argv: list[str], optind: int) -> tuple[int | str, str | None, int]:
        """spamc_getopt_long: (option, value, next index); option -1 ends the options."""
        argc = len(argv)
        if optind >= argc:
            return -1, None, optind
        arg = argv[optind]
        if not arg.startswith("-") or arg in ("-", "--"):
            return -1, None, optind
        if arg[1] != "-":
            char = arg[1]  # one letter per argument; anything after it is ignored
            if char == ":":
                self.getopt_error(f"Error in argument {optind}, char 2: : in flags")
                return "?", None, optind + 1
            pos = OPTSTRING.find(char)
            optind += 1
            if pos < 0:
                self.getopt_error(f"Error in argument {optind - 1}, char 2: option not found {char}")
                return "?", None, optind
            if OPTSTRING[pos + 1 : pos + 2] == ":":
                if optind >= argc or argv[optind].startswith("-"):
                    self.getopt_error(f"Error in argument {optind - 1}, char 2: argument required for option {char}")
                    return "?", None, optind
                return char, argv[optind], optind + 1
            return char, None, optind
        optind += 1
        if arg[2] == ":":
            self.getopt_error(f"Error in argument {optind} : : in flags")
            return "?", None, optind
        name, eq, value = arg[2:].partition("=")
        inline = value if eq else None
        for long_name, has_arg, val in LONG_OPTIONS:
            if long_name != name:
                continue
            optarg = None
            if has_arg == REQUIRED_ARG:
                if inline is None and (optind >= argc or argv[optind].startswith("-")):
                    self.getopt_error(f"Error in argument {optind - 1} : argument required for option {arg}")
                    return "?", None, optind
                if inline is not None:
                    optarg = inline
                else:
                    optarg = argv[optind]
                    optind += 1
            elif has_arg == OPTIONAL_ARG:
                if inline is not None:
                    optarg = inline
                elif optind < argc and not argv[optind].startswith("-"):
                    optarg = argv[optind]
                    optind += 1
            return val, optarg, optind
        self.getopt_error(f"Error in argument {optind - 1} : option not found {arg}")
        return "?", None, optind

    def getopt_error(self, text: str) -> None:
        _stderr(text)

    def current_user(self) -> int:
        """spamc's get_current_user: the effective user's login name unless -u."""
        if self.opts.username is not None:
            return EX_OK
        import pwd

        try:
            self.opts.username = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            _stderr("getpwuid() failed: Success")
            if self.opts.flags & F_CHECK_ONLY:
                self.printf("0/0\n")
                return EX_NOTSPAM
            return EX_OSERR
        return EX_OK

    # ---- transport

    def transport_setup(self) -> int:
        o = self.opts
        flags = o.flags
        family = _socket.AF_UNSPEC
        if flags & F_USE_INET4 and not flags & F_USE_INET6:
            family = _socket.AF_INET
        elif flags & F_USE_INET6 and not flags & F_USE_INET4:
            family = _socket.AF_INET6
        if o.transport_type == TRANSPORT_UNIX:
            return EX_OK
        if o.transport_type == TRANSPORT_LOCALHOST:
            try:
                self.hosts = [_socket.getaddrinfo(None, o.port, family, _socket.SOCK_STREAM)]
            except OSError as e:
                self.log(f"getaddrinfo for a loopback address failed: {e.strerror}")
                return EX_OSERR
            return EX_OK
        errbits = 0
        for hostname in o.hostname.split(","):
            if len(self.hosts) == 256:
                self.log("hit limit of 256 hosts, ignoring remainder")
                break
            try:
                # bytes: a str host would go through the idna codec, which costs an import
                self.hosts.append(_socket.getaddrinfo(os.fsencode(hostname), o.port, family, _socket.SOCK_STREAM))
            except _socket.gaierror as e:
                self.log(f"getaddrinfo({hostname}) failed: {e.strerror}")
                if e.errno == _socket.EAI_AGAIN:
                    errbits |= 1
                elif e.errno in _PERMANENT_EAI:
                    errbits |= 2
                else:  # libspamc's "should not happen" (EAI_ADDRFAMILY, EAI_NODATA: GNU-only codes)
                    return EX_OSERR
            except (OSError, UnicodeError) as e:
                self.log(f"getaddrinfo({hostname}) failed: {e}")
                errbits |= 2
        if not self.hosts:
            if errbits & 1:
                self.log(f"could not resolve any hosts ({o.hostname}): a temporary error occurred")
                return EX_TEMPFAIL
            self.log(f"could not resolve any hosts ({o.hostname}): no such host")
            return EX_NOHOST
        if flags & F_RANDOMIZE_HOSTS and len(self.hosts) > 1:
            shift = int.from_bytes(os.urandom(2), "big") % len(self.hosts)
            self.hosts = self.hosts[shift:] + self.hosts[:shift]
        if not flags & F_SAFE_FALLBACK:
            del self.hosts[1:]  # no fail-over with -x
        return EX_OK

    @staticmethod
    def translate_connect_errno(err: int) -> int:
        import errno

        if err in (errno.ECONNREFUSED, errno.ETIMEDOUT, errno.ENETUNREACH):
            return EX_UNAVAILABLE
        if err == errno.EACCES:
            return EX_NOPERM
        return EX_SOFTWARE

    def open_socket(self, family: int, kind: int, proto: int) -> _socket.socket | int:
        import errno

        try:
            return _socket.socket(family, kind, proto)
        except OSError as e:
            kind_name = {_socket.AF_UNIX: "PF_UNIX", _socket.AF_INET: "PF_INET", _socket.AF_INET6: "PF_INET6"}
            self.log(f"socket({kind_name.get(family, 'Unknown')}) to spamd failed: {e.strerror}")
            if e.errno == errno.EACCES:
                return EX_NOPERM
            if e.errno in (errno.ENFILE, errno.EMFILE, errno.ENOBUFS, errno.ENOMEM):
                return EX_OSERR
            return EX_SOFTWARE

    def connect_timeout(self, sock: _socket.socket) -> None:
        timeout = self.opts.connect_timeout
        sock.settimeout(timeout if timeout > 0 else None)

    def connect(self) -> _socket.socket | int:
        """libspamc's _try_to_connect_unix / _try_to_connect_tcp."""
        o = self.opts
        if o.socketpath is not None:
            sock = self.open_socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0)
            if isinstance(sock, int):
                return sock
            path = os.fsencode(o.socketpath)[:107]  # sun_path, as strncpy leaves it
            self.connect_timeout(sock)
            try:
                sock.connect(path)
            except OSError as e:
                sock.close()
                err = e.errno if e.errno is not None else _eintr()
                self.log(f"connect(AF_UNIX) to spamd using --socket='{os.fsdecode(path)}' failed: {os.strerror(err)}")
                return self.translate_connect_errno(err)
            return sock
        import errno
        import time

        retry_sleep = o.retry_sleep if o.retry_sleep >= 0 else 1
        connect_retries = o.connect_retries or 3
        nhosts = len(self.hosts)
        origerr = 0
        for numloops in range(connect_retries):
            innocent = False
            for family, kind, proto, _canon, address in self.hosts[numloops % nhosts]:
                sock = self.open_socket(family, kind, proto)
                if isinstance(sock, int):
                    continue
                host = str(address[0])
                if host == "255.255.255.255":  # spamc's "always fail" test address
                    self.log(f"connect to spamd on {host} failed, broadcast addr")
                    failed = True
                else:
                    self.connect_timeout(sock)
                    try:
                        sock.connect(address)
                        failed = False
                    except OSError as e:
                        origerr = e.errno if e.errno is not None else _eintr()
                        failed = True
                if not failed:
                    return sock
                sock.close()
                innocent = origerr == errno.ECONNREFUSED and numloops + 1 < nhosts
                self.log(
                    f"connect to spamd on {host} failed, retrying (#{numloops + 1} of {connect_retries}): "
                    f"{os.strerror(origerr)}"
                )
            if numloops + 1 < connect_retries and not innocent:
                time.sleep(retry_sleep)
        self.log(f"connection attempt to spamd aborted after {connect_retries} retries")
        return self.translate_connect_errno(origerr)

    def ssl_context(self) -> object | int:
        """The TLS setup of spamc -S: no certificate check unless a CA is given."""
        import ssl

        o = self.opts
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if o.ssl_ca_file or o.ssl_ca_path:
            try:
                context.load_verify_locations(o.ssl_ca_file, o.ssl_ca_path)
            except (OSError, ssl.SSLError) as e:
                self.log(f"error loading CA file {o.ssl_ca_file} or path {o.ssl_ca_path}: {e}")
                return EX_OSERR
            context.verify_mode = ssl.CERT_REQUIRED
        if o.flags & F_CLIENT_SSL_CERT and o.ssl_cert_file:
            try:
                context.load_cert_chain(o.ssl_cert_file, o.ssl_key_file)
            except (OSError, ssl.SSLError) as e:
                self.log(f"unable to load certificate file {o.ssl_cert_file} or key {o.ssl_key_file}: {e}")
                return EX_OSERR
        return context

    def start_tls(self, sock: _socket.socket, context: object) -> _socket.socket | int:
        import socket
        import ssl

        assert isinstance(context, ssl.SSLContext)
        timeout = sock.gettimeout()
        plain = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
        plain.settimeout(timeout)
        try:
            return context.wrap_socket(plain)
        except (OSError, ValueError) as e:
            plain.close()
            self.log(f"SSL_connect error: {e}")
            return EX_UNAVAILABLE

    def open_connection(self, ssl_context: object | None) -> _Connection | int:
        sock = self.connect()
        if isinstance(sock, int):
            return sock
        timeout = self.opts.timeout
        sock.settimeout(timeout if timeout > 0 else None)
        if ssl_context is not None:
            sock = self.start_tls(sock, ssl_context)
            if isinstance(sock, int):
                return sock
        return _Connection(sock)

    def send(self, conn: _Connection, head: bytes, body: bytes) -> None:
        """Send the request; errors are ignored (the response read will tell), as in spamc."""
        try:
            conn.sock.sendall(head)
            if body:
                conn.sock.sendall(body)
            if not self.opts.flags & F_USE_SSL:
                conn.sock.shutdown(_socket.SHUT_WR)
        except OSError:
            pass

    # ---- messages

    def message_read(self, m: _Message) -> int:
        if self.opts.flags & F_PING:
            m.is_spam = EX_TOOBIG
            return EX_OK  # a ping sends no message: stdin is not read
        m.is_spam = EX_TOOBIG
        limit = m.max_len + 1
        parts: list[bytes] = []
        got = 0
        while got < limit:
            try:
                chunk = os.read(0, min(1 << 20, limit - got))
            except InterruptedError:
                continue
            except OSError as e:
                self.log(f"reading the message failed: {e.strerror}")
                self.stdin_failed = True
                return EX_IOERR
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        raw = b"".join(parts)
        if not raw:
            return EX_IOERR
        m.raw = raw
        m.type = MESSAGE_ERROR
        if len(raw) > m.max_len:
            self.log(f"skipped message, greater than max message size ({m.max_len} bytes)")
            return EX_TOOBIG
        if self.opts.flags & F_BSMTP:
            return self.split_bsmtp(m)
        m.type = MESSAGE_RAW
        m.msg = m.out = raw
        return EX_OK

    @staticmethod
    def split_bsmtp(m: _Message) -> int:
        """libspamc's _message_read_bsmtp: the message between DATA and the lone dot, unstuffed."""
        raw = m.raw
        raw_len = len(raw)
        p = 0
        start = -1
        while raw_len - p > 8:  # room for at least \nDATA\n.\n
            q = raw.find(b"\n", p, raw_len - 8)
            if q < 0:
                break
            q += 1
            if raw[q : q + 4].lower() == b"data":
                q += 4
                if raw[q] == 0x0D:
                    q += 1
                c = raw[q]
                q += 1
                if c == 0x0A:
                    start = q
                    break
            p = q
        if start < 0:
            return EX_DATAERR
        body = raw[start:]
        lines = body.split(b"\n")
        kept: list[bytes] = []
        post: bytes | None = None
        offset = 0
        for index, line in enumerate(lines):
            last = index == len(lines) - 1
            if line[:1] == b".":
                if line == b"." or (line == b".\r" and not last):
                    post = body[offset:]
                    break
                if line[1:2] == b".":
                    line = line[1:]  # an escaping dot
            kept.append(line if last else line + b"\n")
            offset += len(lines[index]) + 1
        if post is None:
            return EX_DATAERR
        m.pre = raw[:start]
        m.msg = m.out = b"".join(kept)
        m.post = post
        m.scanned = m.pre + m.msg + body[len(m.msg) :]
        m.type = MESSAGE_BSMTP
        return EX_OK

    def message_write(self, fd: int, m: _Message) -> bool:
        if self.opts.flags & (F_CHECK_ONLY | F_PING):
            if m.is_spam in (EX_ISSPAM, EX_NOTSPAM):
                return self.write_all(fd, m.out)
            self.log(f"oops! SPAMC_CHECK_ONLY is_spam: {m.is_spam}")
            return False
        if m.type == MESSAGE_NONE:
            self.log("Cannot write this message, it's MESSAGE_NONE!")
            return False
        if m.type == MESSAGE_ERROR:
            return self.write_all(fd, m.raw)
        if m.type == MESSAGE_RAW:
            return self.write_all(fd, m.out)
        return self.write_all(fd, m.pre + m.out.replace(b"\n.", b"\n..") + m.post)

    def message_dump(self, fd: int, m: _Message) -> None:
        """Write what was read, then copy the rest of stdin (a message over the size limit)."""
        if m.type != MESSAGE_NONE:
            self.message_write(fd, m)
        if self.stdin_failed:
            return
        while True:
            try:
                chunk = os.read(0, 65536)
            except InterruptedError:
                continue
            except OSError:
                self.stdin_failed = True
                return
            if not chunk or not self.write_all(fd, chunk):
                return

    def use_msg_for_out(self, m: _Message) -> None:
        m.out = m.msg

    def request_head(self, method: bytes, m: _Message, body_len: int) -> bytes:
        """The request line and headers exactly as message_filter builds them."""
        flags = self.opts.flags
        head = method + b" " + PROTOCOL_VERSION + b"\r\n"
        if not flags & F_PING:
            username = self.opts.username
            if username is not None:
                user = os.fsencode(username)
                if len(user) + 8 >= LINE_BUFSIZ - len(head):
                    raise _Fail(EX_OSERR)
                head += b"User: " + user + b"\r\n"
            if flags & F_USE_ZLIB:
                head += b"Compress: zlib\r\n"
            if len(m.msg) > SPAMC_MAX_MESSAGE_LEN or len(head) + 27 >= LINE_BUFSIZ - len(head):
                raise _Fail(EX_DATAERR)
            head += b"Content-length: %d\r\n" % body_len
        return head + b"\r\n"

    def handle_header(self, m: _Message, line: bytes) -> int:
        """libspamc's _handle_spamd_header; returns DidSet/DidRemove bits."""
        flags = self.opts.flags
        spam = _scanf(b"Spam: %5s ; %20s / %20s", line)
        if len(spam) == 3:
            flag, score, threshold = (x for x in spam if isinstance(x, bytes))
            m.score = max(-1e10, min(1e10, _locale_safe_float(score[:19])))
            m.threshold = max(-1e10, min(1e10, _locale_safe_float(threshold[:19])))
            m.is_spam = EX_ISSPAM if flag.lower() == b"true" else EX_NOTSPAM
            if flags & F_CHECK_ONLY or (flags & F_REPORT_IFSPAM and m.is_spam == EX_ISSPAM) or flags & F_REPORT:
                m.out = b"%.1f/%.1f\n" % (m.score, m.threshold)
            return 0
        length = _scanf(b"Content-length: %d", line)
        if length:
            assert isinstance(length[0], int)
            m.content_length = length[0]
            if m.content_length < 0:
                self.log(f"spamd responded with bad Content-length '{os.fsdecode(line)}'")
            return 0
        for fmt, local, remote in (
            (b"DidSet: %14s", SET_LOCAL, SET_REMOTE),
            (b"DidRemove: %14s", REMOVE_LOCAL, REMOVE_REMOTE),
        ):
            did = _scanf(fmt, line)
            if did:
                assert isinstance(did[0], bytes)
                return (local if b"local" in did[0] else 0) | (remote if b"remote" in did[0] else 0)
        return 0

    def read_status(self, conn: _Connection) -> tuple[bytes, int]:
        line = conn.readline()
        status = _scanf(b"SPAMD/%18s %d %*s", line)
        if len(status) != 2:
            self.log(f"spamd responded with bad string '{os.fsdecode(line)}'")
            raise _Fail(EX_PROTOCOL)
        version, response = status
        assert isinstance(version, bytes) and isinstance(response, int)
        if _locale_safe_float(version) < 1.0:
            self.log(f"spamd responded with bad version string '{os.fsdecode(version)}'")
            raise _Fail(EX_PROTOCOL)
        return version, response

    def read_headers(self, conn: _Connection, m: _Message) -> int:
        didtell = 0
        while True:
            line = conn.readline()
            if not line:
                return didtell
            didtell |= self.handle_header(m, line)

    def message_filter(self, m: _Message) -> int:
        """libspamc's message_filter: one request, the response parsed into ``m``."""
        o = self.opts
        flags = o.flags
        m.is_spam = EX_TOOBIG
        m.alloced = _c_int(m.max_len + EXPANSION_ALLOWANCE + 1)
        m.out = b""
        conn: _Connection | None = None
        ssl_context = None
        try:
            if flags & F_USE_SSL:
                ssl_context = self.ssl_context()
                if isinstance(ssl_context, int):
                    raise _Fail(ssl_context)
            if flags & F_CHECK_ONLY:
                method = b"CHECK"
            elif flags & F_REPORT_IFSPAM:
                method = b"REPORT_IFSPAM"
            elif flags & F_REPORT:
                method = b"REPORT"
            elif flags & F_SYMBOLS:
                method = b"SYMBOLS"
            elif flags & F_PING:
                method = b"PING"
            elif flags & F_HEADERS:
                method = b"HEADERS"
            else:
                method = b"PROCESS"
            body = m.msg
            if flags & F_USE_ZLIB:
                import zlib

                body = zlib.compress(m.msg, 3)
            head = self.request_head(method, m, len(body))
            # the filter loop: retried (on the next host) only when reading the answer failed
            attempt = 0
            failure = EX_SOFTWARE
            while attempt == 0 or (attempt < o.filter_retries and failure == EX_IOERR):
                if attempt:
                    if conn is not None:
                        conn.close()
                        conn = None
                    if len(self.hosts) > 1:
                        self.hosts = self.hosts[1:] + self.hosts[:1]
                    import time

                    time.sleep(o.filter_retry_sleep if o.filter_retry_sleep >= 0 else 1)
                attempt += 1
                opened = self.open_connection(ssl_context)
                if isinstance(opened, int):
                    self.use_msg_for_out(m)
                    return opened  # connection errors are not retried here
                conn = opened
                self.send(conn, head, body)
                try:
                    version, response = self.read_status(conn)
                    failure = EX_OK
                except _Fail as e:
                    if e.code != EX_IOERR or not (attempt < o.filter_retries):
                        raise
                    failure = EX_IOERR
            assert conn is not None
            if flags & F_PING:
                m.out = b"SPAMD/%s %d\n" % (version, response)
                m.is_spam = EX_NOTSPAM
                return EX_OK
            m.score = m.threshold = 0.0
            m.is_spam = EX_TOOBIG
            self.read_headers(conn, m)
            if flags & F_CHECK_ONLY:
                if m.is_spam == EX_TOOBIG:
                    raise _Fail(EX_PROTOCOL)  # no Spam: header
                return EX_OK
            if m.content_length < 0:
                raise _Fail(EX_PROTOCOL)
            if m.out:
                m.content_length += len(m.out)  # the score line spamc put before a report
            limit = m.alloced - len(m.out)  # the body must fit libspamc's buffer
            data = conn.read_body(limit) if limit > 0 else b""
            got = len(data) if data is not None else -1
            if got + len(m.out) > m.alloced - 1:
                raise _Fail(EX_TOOBIG)
            out_len = len(m.out) + got
            if out_len != m.content_length:
                self.log(f"failed sanity check, {m.content_length} bytes claimed, {out_len} bytes seen")
                raise _Fail(EX_PROTOCOL)
            assert data is not None
            m.out += data
            if flags & F_HEADERS:
                return self.append_original_body(m)
            return EX_OK
        except _Fail as e:
            self.use_msg_for_out(m)
            return e.code
        finally:
            if conn is not None:
                conn.close()

    def append_original_body(self, m: _Message) -> int:
        """HEADERS: after the returned header block, the body of the message as read."""
        # libspamc searches its input buffer, which -B has unstuffed in place
        raw = m.scanned if m.type == MESSAGE_BSMTP else m.raw
        start = _body_start(raw)
        if start is None:
            self.log("failed to find end-of-headers")
            self.use_msg_for_out(m)
            return EX_OK  # spamc then prints the message as it came in
        body = raw[start:]
        m.answer_headers = m.out
        body = body[: max(0, m.alloced - 1 - len(m.out))]
        nul = body.find(b"\0")
        if nul >= 0:  # spamc copies the body with strncpy
            body = body[:nul] + bytes(len(body) - nul)
        m.out += body
        return EX_OK

    def message_tell(self, m: _Message, msg_class: int, tellflags: int) -> tuple[int, int]:
        """libspamc's message_tell: returns (code, DidSet/DidRemove bits)."""
        o = self.opts
        m.is_spam = EX_TOOBIG
        m.alloced = _c_int(m.max_len + EXPANSION_ALLOWANCE + 1)
        m.out = b""
        conn: _Connection | None = None
        try:
            ssl_context = None
            if o.flags & F_USE_SSL:
                ssl_context = self.ssl_context()
                if isinstance(ssl_context, int):
                    raise _Fail(ssl_context)
            head = b"TELL " + PROTOCOL_VERSION + b"\r\n"
            if msg_class:
                head += b"Message-class: " + (b"spam" if msg_class == CLASS_SPAM else b"ham") + b"\r\n"
            for header, local, remote in ((b"Set", SET_LOCAL, SET_REMOTE), (b"Remove", REMOVE_LOCAL, REMOVE_REMOTE)):
                targets = [name for bit, name in ((local, b"local"), (remote, b"remote")) if tellflags & bit]
                if targets:
                    head += header + b": " + b",".join(targets) + b"\r\n"
            if o.username is not None:
                user = os.fsencode(o.username)
                if len(user) + 8 >= LINE_BUFSIZ - len(head):
                    raise _Fail(EX_OSERR)
                head += b"User: " + user + b"\r\n"
            if len(m.msg) > SPAMC_MAX_MESSAGE_LEN or len(head) + 27 >= LINE_BUFSIZ - len(head):
                raise _Fail(EX_DATAERR)
            head += b"Content-length: %d\r\n\r\n" % len(m.msg)
            opened = self.open_connection(ssl_context)
            if isinstance(opened, int):
                raise _Fail(opened)
            conn = opened
            self.send(conn, head, m.msg)
            self.read_status(conn)
            m.score = m.threshold = 0.0
            return EX_OK, self.read_headers(conn, m)
        except _Fail as e:
            self.use_msg_for_out(m)
            return e.code, 0
        finally:
            if conn is not None:
                conn.close()

    # ---- main

    def run(self, argv: list[str]) -> int:
        """spamc's main(); ``argv[0]`` is the program name."""
        o = self.opts
        config_file: str | None = None
        for i, arg in enumerate(argv):
            if arg.startswith("-F"):
                config_file = argv[i + 1] if i + 1 < len(argv) else None
                break
        combo = self.combine_args(config_file, argv)
        if combo == EX_CONFIG:
            return EX_CONFIG
        ret = self.read_args(combo if isinstance(combo, list) else argv)
        if ret != EX_OK:
            return EX_OK if ret == EX_TEMPFAIL else ret
        ret = self.current_user()
        if ret != EX_OK:
            return ret

        m = self.message = _Message(o.max_size & 0xFFFFFFFF)  # max_len is unsigned in libspamc
        flags = o.flags
        told = False
        ret = self.transport_setup()
        if ret == EX_OK:
            ret = self.message_read(m)
        if ret == EX_OK:
            if flags & (F_LEARN | F_REPORT_MSG):
                msg_class, tellflags, wanted = self.tell_request()
                ret, did = self.message_tell(m, msg_class, tellflags)
                told = bool(did & wanted)
            else:
                ret = self.message_filter(m)
        if ret != EX_OK:
            return self.fail(m, ret)

        fd = self.output_fd()
        if flags & F_LEARN:
            self.printf("Message successfully un/learned\n" if told else "Message was already un/learned\n")
            return EX_OK
        if flags & F_REPORT_MSG:
            self.printf("Message successfully reported/revoked\n" if told else "Unable to report/revoke message\n")
            return EX_OK
        if not self.message_write(fd, m):
            return self.fail(m, EX_OK)
        if (flags & F_CHECK_ONLY or o.use_exit_code) and m.is_spam != EX_TOOBIG:
            return m.is_spam
        return EX_OK

    def tell_request(self) -> tuple[int, int, int]:
        """-L / -C as TELL: (Message-class, Set/Remove bits, the Did* bit that means success)."""
        o = self.opts
        if o.flags & F_LEARN:
            if o.extratype in (0, 1):  # spam, ham
                return (CLASS_SPAM if o.extratype == 0 else CLASS_HAM), SET_LOCAL, SET_LOCAL
            return 0, REMOVE_LOCAL, REMOVE_LOCAL  # forget
        if o.extratype == 0:  # report
            return CLASS_SPAM, SET_LOCAL | SET_REMOTE, SET_REMOTE
        return CLASS_HAM, SET_LOCAL | REMOVE_REMOTE, REMOVE_REMOTE  # revoke

    def recover(self) -> int:
        """After a bug: the safe fallback if nothing was printed yet, else EX_SOFTWARE."""
        if self.message is None or self.output_written:
            return EX_SOFTWARE
        try:
            return self.fail(self.message, EX_SOFTWARE)
        except Exception:
            return EX_SOFTWARE

    def fail(self, m: _Message, ret: int) -> int:
        """The end of spamc's main() when something went wrong: the safe fallback."""
        flags = self.opts.flags
        result = ret if ret != EX_OK else m.is_spam
        if flags & (F_LEARN | F_PING):
            self.output_fd()
            return ret
        if flags & (F_CHECK_ONLY | F_REPORT | F_REPORT_IFSPAM):
            self.write_all(self.output_fd(), b"0/0\n")
        elif flags & F_SYMBOLS:
            self.write_all(self.output_fd(), b"\n")  # spamc bug 4991: only a blank line
        elif flags & F_SAFE_FALLBACK or result == EX_TOOBIG:
            self.message_dump(self.output_fd(), m)
        # else (-x): no output at all, and the -e command is not started
        if ret == EX_TOOBIG or flags & F_SAFE_FALLBACK:
            ret = EX_OK
        elif self.opts.use_exit_code:
            ret = result
        if not flags & F_SAFE_FALLBACK and flags & F_UNAVAIL_TEMPFAIL and ret == EX_UNAVAILABLE:
            ret = EX_TEMPFAIL
        return ret


# --------------------------------------------------------------------------- for other programs


class SpamdError(Exception):
    """A spamd request failed; ``code`` is the sysexits code spamc would have seen."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class SpamdAnswer:
    """What the daemon said about a message (PROCESS or HEADERS)."""

    __slots__ = ("message", "score", "threshold", "is_spam")

    def __init__(self, message: bytes, score: float | None, threshold: float | None, is_spam: bool | None) -> None:
        self.message = message  # the rewritten message (HEADERS: new header block + original body)
        self.score = score  # None (and so the others) when the answer carried no Spam: header
        self.threshold = threshold
        self.is_spam = is_spam


def spamd_request(
    message: bytes,
    *,
    address: str | tuple[str, int],
    user: str | None = None,
    method: str = "PROCESS",
    timeout: float = 600,
    connect_retries: int = 3,
    max_size: int = DEFAULT_MAX_SIZE,
    prog: str = "filterc",
) -> SpamdAnswer:
    """One PROCESS or HEADERS request, made exactly as filterc (so spamc) makes it.

    ``address`` is a Unix socket path or (host, port); ``timeout`` bounds connecting and each
    read or write; ``max_size`` sizes the answer buffer as spamc's ``-s`` does (the answer may
    exceed it by 16 KiB). Connection failures and bad answers raise `SpamdError`; failures are
    logged to stderr as ``prog: ...``. The caller decides what a failure means (filterc's
    safe fallback is to pass the message on unchanged).
    """
    if method not in ("PROCESS", "HEADERS"):
        raise ValueError(f"unsupported method {method!r}")
    client = _Client(prog)
    o = client.opts
    o.username = user
    o.timeout = o.connect_timeout = timeout
    o.connect_retries = max(1, connect_retries)
    o.flags |= F_USE_INET4 | F_USE_INET6 | (F_HEADERS if method == "HEADERS" else 0)
    if isinstance(address, str):
        o.transport_type, o.socketpath = TRANSPORT_UNIX, address
    else:
        o.transport_type, (o.hostname, o.port) = TRANSPORT_TCP, address
    code = client.transport_setup()
    if code != EX_OK:
        raise SpamdError(code)
    m = _Message(max(max_size, len(message)))
    m.type = MESSAGE_RAW
    m.raw = m.msg = m.out = message
    code = client.message_filter(m)
    if code != EX_OK:
        raise SpamdError(code)
    out = m.out
    if m.answer_headers is not None:
        # HEADERS: spamc rebuilds the message in its C buffer (cut to fit, a NUL ends the body);
        # a delivery agent stores what it gets, so the original body goes back as it was.
        out = m.answer_headers + message[_body_start(message) or len(message) :]
    if m.is_spam == EX_TOOBIG:  # no Spam: header in the answer
        return SpamdAnswer(out, None, None, None)
    # libspamc keeps C floats (4.9 -> 4.9000001); the daemon writes at most a few decimals
    score, threshold = round(m.score, 3), round(m.threshold, 3)
    return SpamdAnswer(out, score, threshold, m.is_spam == EX_ISSPAM)


def _body_start(message: bytes) -> int | None:
    """Where the body starts, by libspamc's rule (after the earlier of CRLF CRLF and LF LF), or
    None without an empty line."""
    starts = [i for i in (message.find(b"\r\n\r\n"), message.find(b"\n\n")) if i >= 0]
    if not starts:
        return None
    start = min(starts)
    return start + (4 if message[start] == 0x0D else 2)


def _stderr(text: str) -> None:
    try:  # noqa: SIM105 - contextlib.suppress would cost an import at start-up
        os.write(2, os.fsencode(text) + b"\n")
    except OSError:
        pass


def _eintr() -> int:
    """The errno spamc sees when its connect alarm fires (a timeout, here)."""
    import errno

    return errno.EINTR


def main(argv: list[str] | None = None) -> int:
    """Run filterc with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = [sys.argv[0] if sys.argv else "filterc", *(sys.argv[1:] if argv is None else argv)]
    client = _Client()
    try:
        code = client.run(args)
    except SystemExit as e:  # -e: the exec path gave up
        code = e.code if isinstance(e.code, int) else EX_SOFTWARE
    except Exception as e:  # a bug: still never lose the message
        client.log(f"internal error: {type(e).__name__}: {e}")
        code = client.recover()
    client.flush_stdio()
    if client.out_fd > 2:
        os.close(client.out_fd)
    if client.stdin_failed or client.write_failed:
        return EX_IOERR
    return code


if __name__ == "__main__":
    raise SystemExit(main())
