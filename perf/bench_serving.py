"""Serving benchmark against any OpenAI-compatible URL (the code is :mod:`axserving.bench.serving`;
``axserving bench serve`` is the same). Example, ours against llama-cpp-python's server::

    .venv/bin/python perf/bench_serving.py --url http://127.0.0.1:18080 --api-key sk-local \\
        --compare http://127.0.0.1:18081 --eos-token-id 2 --concurrency 1,4,8 --json bench.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from axserving.bench.serving import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
