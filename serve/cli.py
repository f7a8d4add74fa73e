"""The `unclip-rt` command: `unclip-rt serve …` starts the images service (`python -m serve`);
anything else is `python -m runtime`'s command line (generation and the image tools). It lives
here, above both, so that the runtime never imports the service."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "serve":
        from serve.__main__ import main as serve_main

        return serve_main(argv[1:])
    from runtime.__main__ import main as runtime_main

    return runtime_main(argv)


if __name__ == "__main__":
    sys.exit(main())
