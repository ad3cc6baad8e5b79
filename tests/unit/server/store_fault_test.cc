// FaultStore (tests/testing/fault_store.h): the failing store other tests rely on must fail
// exactly the calls it was told to, store nothing for them, and forward everything else.

#include <memory>
#include <string>
#include <vector>

#include "chat/store.h"
#include "doctest/doctest.h"
#include "tests/testing/fault_store.h"

namespace chat {
namespace {

std::vector<AppendRequest> OneMessage(const std::string& key) {
  AppendRequest r;
  r.peer = "bob";
  r.sender = "alice";
  r.sender_device = "phone";
  r.client_msg_id = key;
  r.message_id = 1;
  r.server_time_ms = 1;
  r.content_type = "text/plain";
  r.body = key;
  return {r};
}

// Bodies of the messages alice can sync in her only conversation (empty when she has none).
std::vector<std::string> Bodies(MessageStore& store) {
  SyncQuery q;
  q.user = "alice";
  q.device = "phone";
  Result<SyncReply> reply = store.Sync(q);
  REQUIRE(reply.ok());
  std::vector<std::string> out;
  for (const Message& m : reply->messages) out.push_back(m.body);
  return out;
}

TEST_CASE("store: fault store fails the n-th append only and stores nothing for it") {
  testing::FaultStore store;
  store.FailNthAppend(2, Unavailable("disk on fire"));
  std::vector<AppendResult> results;

  CHECK(store.Append(OneMessage("m1"), &results).ok());
  CHECK(results.size() == 1);
  Status failed = store.Append(OneMessage("m2"), &results);
  CHECK(failed.code() == Code::kUnavailable);
  CHECK(failed.message() == "disk on fire");
  CHECK(results.empty());
  CHECK(store.Append(OneMessage("m3"), &results).ok());
  CHECK(results[0].message.seq == 2);

  CHECK(store.append_calls() == 3);
  CHECK(store.failed_appends() == 1);
  CHECK(Bodies(store) == std::vector<std::string>{"m1", "m3"});
}

TEST_CASE("store: fault store fails every append until healed") {
  auto target = NewMemoryStore();
  testing::FaultStore store(target);
  store.FailAllAppends(Internal("broken"));
  std::vector<AppendResult> results;
  for (int i = 0; i < 3; ++i) {
    Status s = store.Append(OneMessage("x" + std::to_string(i)), &results);
    CHECK(s.code() == Code::kInternal);
    CHECK(s.message() == "broken");
  }
  CHECK(Bodies(*target).empty());

  store.Heal();
  CHECK(store.Append(OneMessage("after"), &results).ok());
  CHECK(results[0].message.seq == 1);
  CHECK(store.failed_appends() == 3);
  CHECK(store.Epoch() == target->Epoch());
  CHECK(Bodies(*target) == std::vector<std::string>{"after"});
}

}  // namespace
}  // namespace chat
