// NewMemoryStore: the MessageStore semantics of store_common over std::map, under one mutex.
// It is meant for tests and ephemeral servers, so it is bounded only by memory.

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "chat/store.h"
#include "src/server/store_common.h"

namespace chat {
namespace {

using server::ConversationHead;

struct Member {
  Role role = Role::kMember;
  Seq joined_seq = 0;
};

struct Watermarks {
  Seq delivered_seq = 0;
  Seq read_seq = 0;
};

struct Conversation {
  ConversationKind kind = ConversationKind::kUnspecified;
  std::string title;
  Seq last_seq = 0;
  Seq first_seq = 0;
  int64_t created_ms = 0;
  int64_t last_activity_ms = 0;
  std::map<UserId, Member> members;
  std::map<Seq, Message> messages;
  // Per (user, device). Receipts will write them; the trait has no such call yet, so they
  // stay at 0 and only shape ConversationInfo.
  std::map<std::pair<UserId, DeviceId>, Watermarks> cursors;
};

struct Data {
  ConversationId next_id = 1;
  std::map<ConversationId, Conversation> conversations;
  std::map<std::pair<UserId, UserId>, ConversationId> direct;  // (low, high)
  std::map<UserId, std::set<ConversationId>> by_user;
  std::map<std::pair<UserId, std::string>, std::pair<ConversationId, Seq>> keys;
};

class MemoryTarget final : public server::AppendTarget {
 public:
  explicit MemoryTarget(Data* data) : data_(data) {}

  Result<std::optional<Message>> FindByKey(const UserId& sender,
                                           const std::string& client_msg_id) override {
    auto it = data_->keys.find({sender, client_msg_id});
    if (it == data_->keys.end()) return std::optional<Message>();
    const auto& [conversation_id, seq] = it->second;
    return std::optional<Message>(data_->conversations.at(conversation_id).messages.at(seq));
  }

  Result<ConversationId> FindDirect(const UserId& low, const UserId& high) override {
    auto it = data_->direct.find({low, high});
    return it == data_->direct.end() ? ConversationId{0} : it->second;
  }

  Result<ConversationId> CreateDirect(const UserId& low, const UserId& high,
                                      int64_t now_ms) override {
    const ConversationId id = data_->next_id++;
    Conversation& c = data_->conversations[id];
    c.kind = ConversationKind::kDirect;
    c.created_ms = now_ms;
    c.last_activity_ms = now_ms;
    c.members[low] = Member{};
    c.members[high] = Member{};
    data_->direct[{low, high}] = id;
    data_->by_user[low].insert(id);
    data_->by_user[high].insert(id);
    return id;
  }

  Result<bool> IsMember(ConversationId conversation_id, const UserId& user) override {
    auto it = data_->conversations.find(conversation_id);
    return it != data_->conversations.end() && it->second.members.contains(user);
  }

  Result<Seq> LastSeq(ConversationId conversation_id) override {
    return data_->conversations.at(conversation_id).last_seq;
  }

  Status Insert(const Message& message) override {
    Conversation& c = data_->conversations.at(message.conversation_id);
    c.messages[message.seq] = message;
    c.last_seq = message.seq;
    if (c.first_seq == 0) c.first_seq = message.seq;
    c.last_activity_ms = message.server_time_ms;
    if (!message.client_msg_id.empty()) {
      data_->keys[{message.sender, message.client_msg_id}] = {message.conversation_id, message.seq};
    }
    return Status::Ok();
  }

  Result<std::vector<UserId>> Members(ConversationId conversation_id) override {
    std::vector<UserId> out;
    for (const auto& [user, member] : data_->conversations.at(conversation_id).members) {
      out.push_back(user);
    }
    return out;
  }

 private:
  Data* data_;
};

class MemorySource final : public server::ReadSource {
 public:
  explicit MemorySource(const Data* data) : data_(data) {}

  Status UserConversations(const UserId& user, std::vector<ConversationHead>* out) override {
    auto it = data_->by_user.find(user);
    if (it == data_->by_user.end()) return Status::Ok();
    for (ConversationId id : it->second) out->push_back(Head(id));
    return Status::Ok();
  }

  Result<std::optional<ConversationHead>> MemberHead(ConversationId conversation_id,
                                                     const UserId& user) override {
    auto it = data_->conversations.find(conversation_id);
    if (it == data_->conversations.end() || !it->second.members.contains(user)) {
      return std::optional<ConversationHead>();
    }
    return std::optional<ConversationHead>(Head(conversation_id));
  }

  Result<ConversationInfo> Describe(ConversationId conversation_id, const UserId& user,
                                    const DeviceId& device) override {
    const Conversation& c = data_->conversations.at(conversation_id);
    ConversationInfo info;
    info.conversation_id = conversation_id;
    info.kind = c.kind;
    info.title = c.title;
    if (c.kind == ConversationKind::kDirect) {
      for (const auto& [member, unused] : c.members) {
        if (member != user) info.peer = member;
      }
    }
    info.last_seq = c.last_seq;
    for (const auto& [key, marks] : c.cursors) {
      if (key.first != user) continue;
      info.read_seq = std::max(info.read_seq, marks.read_seq);
      if (key.second == device) info.delivered_seq = marks.delivered_seq;
    }
    for (auto it = c.messages.upper_bound(info.read_seq); it != c.messages.end(); ++it) {
      if (it->second.sender != user) ++info.unread;
    }
    info.first_seq = c.first_seq;
    info.role = c.members.at(user).role;
    info.member_count = static_cast<uint32_t>(c.members.size());
    info.last_activity_ms = c.last_activity_ms;
    return info;
  }

  Status ReadAscending(ConversationId conversation_id, Seq from_seq, Seq to_seq, size_t max,
                       std::vector<Message>* out) override {
    const auto& messages = data_->conversations.at(conversation_id).messages;
    size_t n = 0;
    for (auto it = messages.lower_bound(from_seq);
         it != messages.end() && it->first <= to_seq && n < max; ++it, ++n) {
      out->push_back(it->second);
    }
    return Status::Ok();
  }

  Status ReadDescending(ConversationId conversation_id, Seq before_seq, size_t max,
                        std::vector<Message>* out) override {
    const auto& messages = data_->conversations.at(conversation_id).messages;
    size_t n = 0;
    for (auto it = std::make_reverse_iterator(messages.lower_bound(before_seq));
         it != messages.rend() && n < max; ++it, ++n) {
      out->push_back(it->second);
    }
    return Status::Ok();
  }

 private:
  ConversationHead Head(ConversationId id) const {
    const Conversation& c = data_->conversations.at(id);
    return ConversationHead{id, c.last_seq, c.first_seq};
  }

  const Data* data_;
};

class MemoryStore final : public MessageStore {
 public:
  MemoryStore() : epoch_(std::random_device{}() | (uint64_t{std::random_device{}()} << 32)) {}

  uint64_t Epoch() const override { return epoch_; }

  Status Append(std::span<const AppendRequest> batch, std::vector<AppendResult>* results) override {
    results->clear();
    results->resize(batch.size());
    std::lock_guard lock(mu_);
    MemoryTarget target(&data_);
    // The map operations cannot fail short of running out of memory, so a batch is either
    // applied whole or the process is gone; no rollback is needed.
    for (size_t i = 0; i < batch.size(); ++i) {
      if (Status s = server::AppendOne(target, batch[i], &(*results)[i]); !s.ok()) return s;
    }
    return Status::Ok();
  }

  Result<SyncReply> Sync(const SyncQuery& query) override {
    std::lock_guard lock(mu_);
    MemorySource source(&data_);
    return server::RunSync(source, query);
  }

  Result<HistoryReply> History(const HistoryQuery& query) override {
    std::lock_guard lock(mu_);
    MemorySource source(&data_);
    return server::RunHistory(source, query);
  }

  Result<std::vector<UserId>> Members(ConversationId conversation_id) override {
    std::lock_guard lock(mu_);
    auto it = data_.conversations.find(conversation_id);
    if (it == data_.conversations.end()) {
      return NotFound("conversation " + std::to_string(conversation_id) + " does not exist");
    }
    MemoryTarget target(&data_);
    return target.Members(conversation_id);
  }

 private:
  const uint64_t epoch_;
  std::mutex mu_;
  Data data_;  // guarded by mu_
};

}  // namespace

std::shared_ptr<MessageStore> NewMemoryStore() { return std::make_shared<MemoryStore>(); }

}  // namespace chat
