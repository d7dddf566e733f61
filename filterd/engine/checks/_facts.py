"""Small lists of public facts the checks compare against: free mailbox providers, the mail
domains of the big providers, URL shorteners, executable file types, often-impersonated
brands. Kept short on purpose: they are facts about the world, not a blocklist.
"""

from __future__ import annotations

__all__ = [
    "BIG_MAIL_PROVIDERS",
    "private_ip",
    "EXECUTABLE_EXTENSIONS",
    "FREEMAIL_DOMAINS",
    "IMPERSONATED_BRANDS",
    "PROVIDER_RELAY_DOMAINS",
    "URL_SHORTENERS",
]

FREEMAIL_DOMAINS: frozenset[str] = frozenset(
    {
        "gmail.com",
        "googlemail.com",
        "yahoo.com",
        "yahoo.co.uk",
        "yahoo.fr",
        "yahoo.de",
        "yahoo.ca",
        "yahoo.com.au",
        "yahoo.co.in",
        "yahoo.com.br",
        "ymail.com",
        "rocketmail.com",
        "hotmail.com",
        "hotmail.co.uk",
        "hotmail.fr",
        "hotmail.de",
        "hotmail.it",
        "msn.com",
        "outlook.com",
        "live.com",
        "live.co.uk",
        "aol.com",
        "aim.com",
        "mail.com",
        "email.com",
        "usa.net",
        "excite.com",
        "juno.com",
        "netscape.net",
        "lycos.com",
        "gmx.com",
        "gmx.net",
        "gmx.de",
        "web.de",
        "yandex.ru",
        "yandex.com",
        "mail.ru",
        "inbox.ru",
        "list.ru",
        "bk.ru",
        "protonmail.com",
        "proton.me",
        "icloud.com",
        "me.com",
        "zoho.com",
        "rediffmail.com",
        "qq.com",
        "163.com",
        "126.com",
        "sina.com",
        "naver.com",
        "hanmail.net",
        "tutanota.com",
        "post.com",
        "consultant.com",
        "myself.com",
        "techie.com",
        "europe.com",
        "asia.com",
        "mail2world.com",
        "hushmail.com",
    }
)

# From-address domain -> provider; a message from one of these domains passed through that
# provider's own servers, so one of its Received hops names one of the provider's domains.
BIG_MAIL_PROVIDERS: dict[str, str] = {
    "hotmail.com": "microsoft",
    "msn.com": "microsoft",
    "outlook.com": "microsoft",
    "live.com": "microsoft",
    "yahoo.com": "yahoo",
    "ymail.com": "yahoo",
    "rocketmail.com": "yahoo",
    "aol.com": "aol",
    "aim.com": "aol",
    "gmail.com": "google",
    "googlemail.com": "google",
}

PROVIDER_RELAY_DOMAINS: dict[str, frozenset[str]] = {
    "microsoft": frozenset({"hotmail.com", "msn.com", "outlook.com", "live.com", "microsoft.com", "passport.com"}),
    "yahoo": frozenset({"yahoo.com", "yahoo.net", "yahoodns.net", "ymail.com"}),
    "aol": frozenset({"aol.com", "aol.net", "aim.com", "mx.aol.com"}),
    "google": frozenset({"google.com", "gmail.com", "googlemail.com"}),
}

URL_SHORTENERS: frozenset[str] = frozenset(
    {
        "bit.ly",
        "bitly.com",
        "t.co",
        "tinyurl.com",
        "goo.gl",
        "ow.ly",
        "is.gd",
        "v.gd",
        "buff.ly",
        "rebrand.ly",
        "cutt.ly",
        "tiny.cc",
        "shorturl.at",
        "rb.gy",
        "t.ly",
        "bl.ink",
        "s.id",
        "lnkd.in",
        "qr.ae",
        "x.co",
        "soo.gd",
        "clck.ru",
        "u.to",
        "adf.ly",
        "shorte.st",
        "tinyurl.hu",
        "snip.ly",
    }
)

EXECUTABLE_EXTENSIONS: frozenset[str] = frozenset(
    {
        "exe",
        "scr",
        "pif",
        "com",
        "bat",
        "cmd",
        "vbs",
        "vbe",
        "js",
        "jse",
        "wsf",
        "wsh",
        "hta",
        "cpl",
        "msi",
        "msp",
        "lnk",
        "jar",
        "ps1",
        "reg",
        "dll",
        "scf",
    }
)

# Names phishers put into host names that are not theirs (substrings of a host's labels).
IMPERSONATED_BRANDS: tuple[str, ...] = (
    "paypal",
    "ebay",
    "amazon",
    "appleid",
    "icloud",
    "microsoft",
    "office365",
    "netflix",
    "wellsfargo",
    "citibank",
    "bankofamerica",
    "hsbc",
    "barclays",
    "fedex",
    "docusign",
    "dropbox",
    "linkedin",
    "facebook",
    "instagram",
    "coinbase",
    "binance",
)


def private_ip(ip: str) -> bool:
    """A source address that never crosses the Internet: RFC 1918, loopback, link-local,
    CGNAT, unique-local IPv6. (Documentation ranges count as public: test mail uses them.)"""
    if ":" in ip:
        low = ip.lower()
        return low == "::1" or low.startswith(("fc", "fd", "fe8", "fe9", "fea", "feb"))
    if ip.startswith(("10.", "127.", "192.168.", "169.254.", "0.")):
        return True
    first, _, rest = ip.partition(".")
    second = rest.partition(".")[0]
    if not second.isdigit():
        return False
    if first == "172":
        return 16 <= int(second) <= 31
    if first == "100":
        return 64 <= int(second) <= 127
    return False
