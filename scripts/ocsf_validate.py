#!/usr/bin/env python3
"""Validates keywarden events against the official OCSF JSON Schema.

Usage: ocsf_validate.py VERSION [FILE ...]   (no FILE, or -, reads stdin)

Each input line is one event (NDJSON). Every event is checked against the
JSON Schema of its class (`class_uid`) in OCSF VERSION, with the profiles
its `metadata.profiles` lists, as the pinned PyPI package
`ocsf-json-schema` builds it from the official schema export, using
`jsonschema`. A finding's evidence (`evidences[].data`, which OCSF types
as free JSON) is an event too, and is checked the same way.

Prints one line per violation, `SOURCE:LINE: PATH: MESSAGE`, then a
summary line `ocsf: N events, M invalid`; exits 1 when any is invalid,
2 on unreadable input. The test suite runs it (scripts/bootstrap.sh
installs both packages into target/pyvenv).
"""

import json
import sys
from collections import Counter

import jsonschema
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema


class Validator:
    def __init__(self, version):
        self.version = version
        self.schema = OcsfJsonSchemaEmbedded(get_ocsf_schema(version))
        self.cache = {}

    def validator(self, class_uid, profiles):
        key = (class_uid, tuple(sorted(profiles)))
        if key not in self.cache:
            name = self.schema.lookup_class_name_from_uid(class_uid)
            schema = self.schema.get_class_schema(name, list(profiles))
            self.cache[key] = jsonschema.Draft202012Validator(schema)
        return self.cache[key]

    def errors(self, event, where=""):
        """Every violation in `event` (and its evidences), as strings."""
        if not isinstance(event, dict):
            return [f"{where or '$'}: not a JSON object"]
        out = []
        meta = event.get("metadata") or {}
        if meta.get("version") != self.version:
            out.append(f"{where}metadata.version: {meta.get('version')!r}, expected {self.version!r}")
        try:
            v = self.validator(event.get("class_uid"), meta.get("profiles") or [])
        except (ValueError, TypeError) as e:
            return out + [f"{where}class_uid: {e}"]
        for err in sorted(v.iter_errors(event), key=lambda e: list(e.absolute_path)):
            path = ".".join(str(p) for p in err.absolute_path) or "$"
            out.append(f"{where}{path}: {err.message}")
        for i, ev in enumerate(event.get("evidences") or []):
            if isinstance(ev, dict) and "data" in ev:
                out += self.errors(ev["data"], f"{where}evidences.{i}.data.")
        return out


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    val = Validator(sys.argv[1])
    files = sys.argv[2:] or ["-"]
    total, invalid, classes = 0, 0, Counter()
    for name in files:
        stream = sys.stdin if name == "-" else open(name, encoding="utf-8")
        with stream:
            for n, line in enumerate(stream, 1):
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except json.JSONDecodeError as e:
                    print(f"{name}:{n}: not JSON: {e}")
                    return 2
                total += 1
                classes[event.get("class_uid")] += 1
                errs = val.errors(event)
                if errs:
                    invalid += 1
                    for e in errs:
                        print(f"{name}:{n}: {e}")
    counts = ", ".join(f"{c}: {k}" for c, k in sorted(classes.items(), key=str))
    print(f"ocsf: {total} events, {invalid} invalid (by class_uid {counts})")
    return 1 if invalid else 0


if __name__ == "__main__":
    sys.exit(main())
