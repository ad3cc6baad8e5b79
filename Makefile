# The two set-up commands (see README.md):
#   make run    install what is missing, build, start chatd on 127.0.0.1
#   make test   install what is missing, build with ASan + UBSan, run the whole suite
JOBS ?= $(shell nproc)
BUILD_TEST ?= build/asan
BUILD_RUN ?= build/release

.PHONY: all deps test run build-test build-run format clean bench

all: build-run

deps:
	@bash scripts/install-deps.sh

build-test: deps
	@cmake -S . -B $(BUILD_TEST) -DCMAKE_BUILD_TYPE=Debug -DCHAT_SANITIZE=ON >/dev/null
	@cmake --build $(BUILD_TEST) -j $(JOBS)

test: build-test
	cd $(BUILD_TEST) && ctest --output-on-failure -j $(JOBS) --timeout 300

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
