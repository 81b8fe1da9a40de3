"""Options merged over defaults with a sentinel for "not given" (None is a real value here),
then the settings object serialised with vars()."""

MISSING = object()

DEFAULTS = {
    "page_size": 100,
    "timeout": 30,
    "include_archived": False,
    "fields": ["id", "name"],
    "filters": {"status": "active", "owner": None},
}


def deep_merge(base, override):
    merged = dict(base)
    for key, value in override.items():
        current = merged.get(key, MISSING)
        if isinstance(current, dict) and isinstance(value, dict):
            merged[key] = deep_merge(current, value)
        elif value is not MISSING:
            merged[key] = value
    return merged


class Settings:
    def __init__(self, **options):
        for key, value in options.items():
            setattr(self, key, value)

    def get(self, name, default=MISSING):
        value = getattr(self, name, default)
        if value is MISSING:
            raise KeyError(name)
        return value


def run(params, context):
    settings = Settings(**deep_merge(DEFAULTS, params.get("options", {})))
    try:
        settings.get("nonexistent")
        missing_raises = False
    except KeyError:
        missing_raises = True
    public = sorted(name for name in dir(settings) if not name.startswith("_"))
    return {"settings": vars(settings), "missing_raises": missing_raises, "public": public}
