# Each target is one CI step a person can run alone.
.PHONY: dev test lint layers fmt bench bench-queue deploy-check cuda-check

# The embedded default: API + worker in one process, SQLite under ./data, no other service.
dev:
	cargo run --release -- dev

# The whole test suite (needs Postgres at $$DATABASE_URL, default postgres://postgres@localhost/test,
# and Redis at $$REDIS_URL, default redis://127.0.0.1:6379; installs the python `openai` client
# into target/py for the proxy's client test, and Debian's chromium + chromedriver for the
# dashboard's browser test, schemathesis into target/schemathesis-venv for the OpenAPI fuzz, and
# Debian's bubblewrap for the eval's coding-probe sandbox, and the `tinker` SDK 0.38.0 into
# target/tinker-venv, run against the fake Tinker).
test:
	CLAAS_TEST_PYTHON="$$(scripts/test-python.sh)" CLAAS_TEST_CHROMEDRIVER="$$(scripts/test-browser.sh)" \
	  CLAAS_TEST_SCHEMATHESIS="$$(scripts/test-schemathesis.sh)" \
	  CLAAS_EVAL_BWRAP="$$(scripts/test-sandbox.sh)" CLAAS_TEST_TINKER_PYTHON="$$(scripts/test-tinker.sh)" \
	  cargo test --workspace --all-targets

lint: layers
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

# The API depends on neither candle nor the trainer, not even in its tests (in-process
# inference lives in claas-engine; tests that drive real workers live in tests/).
layers:
	@if cargo tree -p claas-api --prefix none | grep -E '^(candle-core|claas-trainer) '; then \
	  echo "claas-api depends on candle or the trainer (cargo tree -p claas-api)"; exit 1; \
	else echo "layers: claas-api depends on neither candle-core nor claas-trainer"; fi

fmt:
	cargo fmt --all

# Queue burn-down benchmark against the local Postgres (see BENCHMARKS.md).
bench-queue:
	cargo run --release -- bench queue --database-url postgres://postgres@localhost/test --jobs 20000 --loras 1000 --workers 16

bench: bench-queue

# deploy/ without Docker or a cluster: compose and Kubernetes manifests against their schemas
# (validators from PyPI in target/deploy-venv), then the API image's build command as a
# plain cargo command (the worker image's needs CUDA; its feature is checked by name).
deploy-check:
	scripts/validate-deploy.sh
	cargo build --release --locked --bin claas

# The CUDA build (`--features cuda`) compiled without a GPU or driver: candle's kernels with
# nvcc from PyPI and all the Rust behind the feature (scripts/cuda-check.sh says what it
# cannot do: link).
cuda-check:
	scripts/cuda-check.sh
