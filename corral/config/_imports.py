"""What connector code may import: each importable module and the attributes its view shows.

Standard library only: the sandbox's child side reads this table too.

The table is an allowlist on purpose. A module's public surface holds more
than pure functions: `functools.update_wrapper` copies attributes the
caller names (`__globals__` included; the view's `wraps` is corral's own, which
copies three names), `functools.singledispatch` evaluates string annotations
with the plain compiler, `collections.UserString.format`
walks attributes from a format string, `time.clock_settime` sets the host's
clock. A name is listed here only when it cannot reach the host whatever it
is called with, and no class listed holds a mutable container (one execution
could leave something in it for the next in a worker). Names a Python
version lacks are skipped.
"""

from __future__ import annotations

from collections.abc import Mapping

_MATH = (
    "acos acosh asin asinh atan atan2 atanh cbrt ceil comb copysign cos cosh degrees dist e "
    "erf erfc exp exp2 expm1 fabs factorial floor fmod frexp fsum gamma gcd hypot inf isclose "
    "isfinite isinf isnan isqrt lcm ldexp lgamma log log10 log1p log2 modf nan nextafter perm pi "
    "pow prod radians remainder sin sinh sqrt sumprod tan tanh tau trunc ulp"
)

#: module -> the attributes its view exposes (space-separated).
SAFE_MODULES: Mapping[str, str] = {
    "base64": "b64encode b64decode standard_b64encode standard_b64decode urlsafe_b64encode "
    "urlsafe_b64decode b32encode b32decode b32hexencode b32hexdecode b16encode b16decode "
    "b85encode b85decode a85encode a85decode encodebytes decodebytes",
    "collections": "ChainMap Counter OrderedDict defaultdict deque namedtuple",
    "datetime": "MAXYEAR MINYEAR UTC date datetime time timedelta timezone tzinfo",
    "decimal": "Decimal Context DecimalException DivisionByZero Inexact InvalidOperation "
    "Overflow Rounded Underflow FloatOperation localcontext getcontext ROUND_05UP "
    "ROUND_CEILING ROUND_DOWN ROUND_FLOOR ROUND_HALF_DOWN ROUND_HALF_EVEN ROUND_HALF_UP "
    "ROUND_UP",
    "functools": "cache cmp_to_key lru_cache partial partialmethod reduce total_ordering wraps",
    "hashlib": "algorithms_available algorithms_guaranteed blake2b blake2s md5 new pbkdf2_hmac "
    "sha1 sha224 sha256 sha384 sha3_224 sha3_256 sha3_384 sha3_512 sha512 shake_128 "
    "shake_256",
    "hmac": "HMAC compare_digest digest new",
    "html": "escape unescape",
    "itertools": "accumulate batched chain combinations combinations_with_replacement compress "
    "count cycle dropwhile filterfalse groupby islice pairwise permutations product repeat "
    "starmap takewhile tee zip_longest",
    "json": "JSONDecodeError JSONDecoder JSONEncoder dumps loads",
    "math": _MATH,
    "random": "Random SystemRandom betavariate choice choices expovariate gauss getrandbits "
    "lognormvariate normalvariate randbytes randint random randrange sample shuffle "
    "triangular uniform",
    "re": "A ASCII DOTALL I IGNORECASE M MULTILINE NOFLAG S U UNICODE VERBOSE X Match Pattern "
    "error escape findall finditer fullmatch match search split sub subn compile",
    "statistics": "StatisticsError correlation covariance fmean geometric_mean harmonic_mean "
    "linear_regression mean median median_grouped median_high median_low mode multimode "
    "pstdev pvariance quantiles stdev variance",
    "string": "Template ascii_letters ascii_lowercase ascii_uppercase capwords digits hexdigits "
    "octdigits printable punctuation whitespace",
    "textwrap": "dedent fill indent shorten wrap",  # not TextWrapper: it holds a class dict
    "time": "altzone asctime ctime daylight gmtime localtime mktime monotonic monotonic_ns "
    "perf_counter perf_counter_ns process_time process_time_ns sleep strftime strptime "
    "struct_time time time_ns timezone tzname",
    "urllib.parse": "DefragResult ParseResult SplitResult parse_qs parse_qsl quote "
    "quote_from_bytes quote_plus unquote unquote_plus unquote_to_bytes urldefrag urlencode "
    "urljoin urlparse urlsplit urlunparse urlunsplit",
    "uuid": "NAMESPACE_DNS NAMESPACE_OID NAMESPACE_URL NAMESPACE_X500 UUID uuid3 uuid4 uuid5",
}

#: Modules connector code may import by default (DESIGN §3).
DEFAULT_ALLOWED_IMPORTS: tuple[str, ...] = (
    "base64", "collections", "datetime", "decimal", "functools", "hashlib", "hmac",
    "itertools", "json", "math", "re", "string", "time", "urllib.parse", "uuid",
)  # fmt: skip


def view_attributes(module: str) -> tuple[str, ...]:
    """The attribute names the view of `module` may show; KeyError if it has no view."""
    return tuple(SAFE_MODULES[module].split())
