# Each target is one CI step a person can run alone.
.PHONY: dev test lint fmt bench bench-queue

# The embedded default: API + worker in one process, SQLite under ./data, no other service.
dev:
	cargo run --release -- dev

# The whole test suite (needs Postgres at $$DATABASE_URL, default postgres://postgres@localhost/test).
test:
	cargo test --workspace --all-targets

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

fmt:
	cargo fmt --all

# Queue burn-down benchmark against the local Postgres (see BENCHMARKS.md).
bench-queue:
	cargo run --release -- bench queue --database-url postgres://postgres@localhost/test --jobs 20000 --loras 1000 --workers 16

bench: bench-queue
