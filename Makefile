# The two set-up commands (see README.md):
#   make run    install what is missing, build, start chatd on 127.0.0.1
#   make test   install what is missing, build with ASan + UBSan, run the whole suite, then
#               run the threaded tests again under ThreadSanitizer and the quick benchmark
#               run against the build `make run` starts
JOBS ?= $(shell nproc)
BUILD_TEST ?= build/asan
BUILD_RUN ?= build/release
BUILD_TSAN ?= build/tsan
# The threaded parts, run again under ThreadSanitizer: the server runtime and its store threads,
# concurrent SQLite readers, the Snowflake generator, the slot pool, the push webhook's thread
# (libcurl, stopped from another thread) and the client (Start/Poll/Close threads).
TSAN_TESTS ?= unit_client|server runtime|store threads|store: sqlite|snowflake|slot pool|push webhook

.PHONY: all deps test test-asan test-tsan test-release run build-test build-run format clean bench

all: build-run

deps:
	@bash scripts/install-deps.sh

build-test: deps
	@cmake -S . -B $(BUILD_TEST) -DCMAKE_BUILD_TYPE=Debug -DCHAT_SANITIZE=ON >/dev/null
	@cmake --build $(BUILD_TEST) -j $(JOBS)

test: test-asan test-tsan test-release

test-asan: build-test
	cd $(BUILD_TEST) && ctest --output-on-failure -j $(JOBS) --timeout 300

test-tsan: deps
	@cmake -S . -B $(BUILD_TSAN) -DCMAKE_BUILD_TYPE=Debug -DCHAT_SANITIZE_THREAD=ON >/dev/null
	@cmake --build $(BUILD_TSAN) -j $(JOBS) --target unit_core unit_server unit_client
	cd $(BUILD_TSAN) && ctest --output-on-failure -j $(JOBS) --timeout 300 -R "$(TSAN_TESTS)"

# The build users run (optimized, jemalloc, no sanitizer): every workload of the quick benchmark
# run must complete with nothing lost, duplicated or reordered (no timing is checked).
test-release: build-run
	@cmake --build $(BUILD_RUN) -j $(JOBS) --target chat-bench
	@bash bench/run.sh --quick --build-dir $(BUILD_RUN) --results-dir $(BUILD_RUN)/quick-results

build-run: deps
	@cmake -S . -B $(BUILD_RUN) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCHAT_BUILD_TESTS=OFF >/dev/null
	@cmake --build $(BUILD_RUN) -j $(JOBS) --target chatd chat-cli

run: build-run
	@bash scripts/run-chatd.sh $(BUILD_RUN)

# Release build into build/bench, chatd and chat-bench pinned to one core each; see
# docs/performance.md. BENCH_ARGS=--quick for the small run, or name workloads.
bench: deps
	@bash bench/run.sh $(BENCH_ARGS)

format:
	@git ls-files '*.h' '*.cc' | xargs clang-format -i

clean:
	rm -rf build
