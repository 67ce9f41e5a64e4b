"""Print the project's pip requirements from pyproject.toml: the dependencies plus those of the given extras.

    python requirements.py pyproject.toml [EXTRA[,EXTRA...]]

The image installs these in a layer of its own (keyed on pyproject.toml only), so a source edit does not
reinstall torch. Self-references such as `lamina[ray]` inside an extra are expanded.
"""

import re
import sys
import tomllib


def main() -> None:
    project = tomllib.load(open(sys.argv[1], "rb"))["project"]
    name = project["name"].lower()
    optional = project.get("optional-dependencies", {})
    wanted = [e.strip() for e in (sys.argv[2] if len(sys.argv) > 2 else "").split(",") if e.strip()]
    out, seen = list(project.get("dependencies", [])), set()
    while wanted:
        extra = wanted.pop()
        if extra in seen:
            continue
        if extra not in optional:
            sys.exit(f"unknown extra {extra!r}; pyproject.toml has: {', '.join(sorted(optional)) or 'none'}")
        seen.add(extra)
        for req in optional[extra]:
            match = re.fullmatch(rf"\s*{re.escape(name)}\s*\[([^\]]*)\]\s*", req, flags=re.IGNORECASE)
            if match:
                wanted.extend(e.strip() for e in match.group(1).split(","))
            else:
                out.append(req)
    print("\n".join(dict.fromkeys(out)))


if __name__ == "__main__":
    main()
