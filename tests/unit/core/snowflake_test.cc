#include "src/core/snowflake.h"

#include <doctest/doctest.h>

#include <algorithm>
#include <memory>
#include <set>
#include <thread>
#include <vector>

#include "tests/testing/fake_clock.h"

namespace chat {
namespace {

using testing::FakeClock;

TEST_CASE("snowflake: an id decodes to its millisecond, node and counter") {
  auto clock = std::make_shared<FakeClock>(kSnowflakeEpochMs + 12'345);
  SnowflakeGenerator generator(513, clock);
  const MessageId first = generator.Next();
  CHECK(SnowflakeGenerator::TimestampMs(first) == kSnowflakeEpochMs + 12'345);
  CHECK(SnowflakeGenerator::Node(first) == 513);
  CHECK(SnowflakeGenerator::Counter(first) == 0);
  CHECK(first == ((uint64_t{12'345} << 22) | (uint64_t{513} << 12)));

  const MessageId second = generator.Next();
  CHECK(SnowflakeGenerator::Counter(second) == 1);
  CHECK(SnowflakeGenerator::TimestampMs(second) == kSnowflakeEpochMs + 12'345);

  clock->Advance(7);
  const MessageId third = generator.Next();
  CHECK(SnowflakeGenerator::TimestampMs(third) == kSnowflakeEpochMs + 12'352);
  CHECK(SnowflakeGenerator::Counter(third) == 0);
}

TEST_CASE("snowflake: the largest node id is kept intact") {
  auto clock = std::make_shared<FakeClock>();
  SnowflakeGenerator generator(kSnowflakeMaxNode, clock);
  const MessageId id = generator.Next();
  CHECK(SnowflakeGenerator::Node(id) == kSnowflakeMaxNode);
  CHECK(SnowflakeGenerator::TimestampMs(id) == clock->WallMs());
}

TEST_CASE("snowflake: ids keep increasing when the wall clock steps back") {
  auto clock = std::make_shared<FakeClock>();
  SnowflakeGenerator generator(1, clock);
  const int64_t start = clock->WallMs();
  MessageId last = generator.Next();
  clock->StepWall(-60'000);  // NTP moves the clock a minute back
  for (int i = 0; i < 100; ++i) {
    const MessageId id = generator.Next();
    CHECK(id > last);
    // The generator stays on its last millisecond instead of following the clock back.
    CHECK(SnowflakeGenerator::TimestampMs(id) == start);
    last = id;
    clock->Advance(1);
  }
  // Once the clock passes the last millisecond again, ids follow it.
  clock->SetWallMs(start + 5);
  const MessageId later = generator.Next();
  CHECK(later > last);
  CHECK(SnowflakeGenerator::TimestampMs(later) == start + 5);
  CHECK(SnowflakeGenerator::Counter(later) == 0);
}

TEST_CASE("snowflake: 10,000 ids in one millisecond stay unique and increasing") {
  auto clock = std::make_shared<FakeClock>();
  SnowflakeGenerator generator(3, clock);
  const int64_t now = clock->WallMs();
  std::vector<MessageId> ids;
  for (int i = 0; i < 10'000; ++i) ids.push_back(generator.Next());
  for (size_t i = 1; i < ids.size(); ++i) REQUIRE(ids[i] > ids[i - 1]);
  // 4096 ids per millisecond: the 4097th borrows the next millisecond.
  CHECK(SnowflakeGenerator::TimestampMs(ids[4095]) == now);
  CHECK(SnowflakeGenerator::Counter(ids[4095]) == 4095);
  CHECK(SnowflakeGenerator::TimestampMs(ids[4096]) == now + 1);
  CHECK(SnowflakeGenerator::Counter(ids[4096]) == 0);
  CHECK(SnowflakeGenerator::TimestampMs(ids[9999]) == now + 2);
  for (MessageId id : ids) CHECK(SnowflakeGenerator::Node(id) == 3);

  // When the real clock reaches the borrowed milliseconds, ids still do not repeat.
  clock->Advance(1);
  CHECK(generator.Next() > ids.back());
}

TEST_CASE("snowflake: a clock before the epoch still yields increasing ids") {
  auto clock = std::make_shared<FakeClock>(kSnowflakeEpochMs - 1'000'000);
  SnowflakeGenerator generator(9, clock);
  const MessageId a = generator.Next();
  const MessageId b = generator.Next();
  CHECK(b > a);
  CHECK(SnowflakeGenerator::TimestampMs(a) == kSnowflakeEpochMs);
}

TEST_CASE("snowflake: generators on different nodes never collide") {
  auto clock = std::make_shared<FakeClock>();
  SnowflakeGenerator one(1, clock);
  SnowflakeGenerator two(2, clock);
  std::set<MessageId> ids;
  for (int i = 0; i < 5000; ++i) {
    CHECK(ids.insert(one.Next()).second);
    CHECK(ids.insert(two.Next()).second);
  }
}

TEST_CASE("snowflake: four threads at once get unique ids, each in increasing order") {
  auto clock = std::make_shared<FakeClock>();
  SnowflakeGenerator generator(77, clock);
  constexpr int kThreads = 4;
  constexpr int kPerThread = 20'000;
  std::vector<std::vector<MessageId>> results(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      results[static_cast<size_t>(t)].reserve(kPerThread);
      for (int i = 0; i < kPerThread; ++i) {
        // One thread also moves the clock back and forth while the others draw ids.
        if (t == 0 && i % 1000 == 0) clock->StepWall(i % 2000 == 0 ? 3 : -5);
        results[static_cast<size_t>(t)].push_back(generator.Next());
      }
    });
  }
  for (std::thread& thread : threads) thread.join();

  std::vector<MessageId> all;
  for (const std::vector<MessageId>& ids : results) {
    REQUIRE(ids.size() == kPerThread);
    for (size_t i = 1; i < ids.size(); ++i) REQUIRE(ids[i] > ids[i - 1]);
    all.insert(all.end(), ids.begin(), ids.end());
  }
  std::sort(all.begin(), all.end());
  CHECK(std::adjacent_find(all.begin(), all.end()) == all.end());
}

}  // namespace
}  // namespace chat
