// Cache: the client's SQLite store of conversations, messages, identity and the outbox.
#include "src/client/cache.h"

#include <doctest/doctest.h>

#include <string>

#include "tests/testing/temp_dir.h"

namespace chat::client {
namespace {

OutboxEntry Entry(const std::string& id, const std::string& body = "b") {
  OutboxEntry e;
  e.client_msg_id = id;
  e.conversation_id = 3;
  e.content_type = "text/plain";
  e.body = body;
  return e;
}

v1::Message Msg(ConversationId c, Seq s) {
  v1::Message m;
  m.set_conversation_id(c);
  m.set_seq(s);
  m.set_body("body-" + std::to_string(s));
  return m;
}

TEST_CASE("cache: the outbox keeps insertion order, rejects a reused id and is bounded") {
  auto cache = Cache::Open("").value();
  OutboxEntry a = Entry("id-a"), b = Entry("id-b"), c = Entry("id-c");
  REQUIRE(cache->AddOutbox(&a, 2).ok());
  REQUIRE(cache->AddOutbox(&b, 2).ok());
  CHECK(a.id < b.id);
  CHECK(cache->AddOutbox(&c, 2).code() == Code::kResourceExhausted);
  OutboxEntry again = Entry("id-a");
  CHECK(cache->AddOutbox(&again, 10).code() == Code::kAlreadyExists);

  REQUIRE(cache->FailOutbox("id-a", PermissionDenied("not a member")).ok());
  CHECK(cache->PendingCount() == 1);
  REQUIRE(cache->AddOutbox(&c, 2).ok());  // failed ones do not count
  auto pending = cache->PendingOutbox(10);
  REQUIRE(pending.size() == 2);
  CHECK(pending[0].client_msg_id == "id-b");
  CHECK(pending[1].client_msg_id == "id-c");
  auto all = cache->ListOutbox();
  REQUIRE(all.size() == 3);
  CHECK(all[0].status == MessageStatus::kFailed);
  CHECK(all[0].reason == PermissionDenied("not a member"));
  REQUIRE(cache->RemoveOutbox("id-b").ok());
  CHECK(cache->PendingCount() == 1);
  CHECK_FALSE(cache->FindOutbox("id-b").has_value());
}

TEST_CASE("cache: messages are stored once per (conversation, seq) and read newest first") {
  auto cache = Cache::Open("").value();
  REQUIRE(cache->PutMessage(Msg(1, 1)).ok());
  REQUIRE(cache->PutMessage(Msg(1, 2)).ok());
  v1::Message changed = Msg(1, 2);
  changed.set_body("other");
  REQUIRE(cache->PutMessage(changed).ok());
  REQUIRE(cache->PutMessage(Msg(1, 4)).ok());
  REQUIRE(cache->PutMessage(Msg(2, 1)).ok());
  CHECK(cache->GetMessage(1, 2)->body() == "body-2");
  CHECK(cache->CountRange(1, 1, 4) == 3);
  CHECK(cache->CountRange(1, 1, UINT64_MAX) == 3);
  auto range = cache->RangeNewestFirst(1, 1, 4, 2);
  REQUIRE(range.size() == 2);
  CHECK(range[0].seq() == 4);
  CHECK(range[1].seq() == 2);
  CHECK(cache->MessageCount() == 4);
}

TEST_CASE("cache: an epoch reset forgets conversations and messages but keeps the outbox") {
  testing::TempDir dir;
  {
    auto cache = Cache::Open(dir.File("c.db")).value();
    REQUIRE(cache->SetIdentity(11, "alice").ok());
    ConversationRow row;
    row.info.conversation_id = 1;
    row.info.peer = "bob";
    row.cursor = 1;
    REQUIRE(cache->PutConversation(row).ok());
    REQUIRE(cache->PutMessage(Msg(1, 1)).ok());
    OutboxEntry e = Entry("id-kept");
    REQUIRE(cache->AddOutbox(&e, 10).ok());
  }
  auto cache = Cache::Open(dir.File("c.db")).value();
  CHECK(cache->Epoch() == 11);
  CHECK(cache->UserId() == "alice");
  REQUIRE(cache->GetConversation(1).has_value());
  CHECK(cache->GetConversation(1)->info.peer == "bob");
  CHECK(cache->GetConversation(1)->cursor == 1);
  REQUIRE(cache->ResetForEpoch(12).ok());
  CHECK(cache->Epoch() == 12);
  CHECK(cache->ListConversations().empty());
  CHECK(cache->MessageCount() == 0);
  CHECK(cache->PendingCount() == 1);
}

TEST_CASE("cache: an uncommitted transaction leaves nothing behind") {
  auto cache = Cache::Open("").value();
  {
    Cache::Transaction txn(cache.get());
    REQUIRE(cache->PutMessage(Msg(1, 1)).ok());
  }
  CHECK(cache->MessageCount() == 0);
  {
    Cache::Transaction txn(cache.get());
    REQUIRE(cache->PutMessage(Msg(1, 1)).ok());
    REQUIRE(txn.Commit().ok());
  }
  CHECK(cache->MessageCount() == 1);
}

}  // namespace
}  // namespace chat::client
