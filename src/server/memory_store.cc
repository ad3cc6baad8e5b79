// NewMemoryStore: the MessageStore semantics of store_common over std::map, under one mutex.
// It is meant for tests and ephemeral servers, so it is bounded only by memory.

#include <algorithm>
#include <deque>
#include <limits>
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
  Seq removed_at_seq = 0;  // non-zero: removed; the row stays for capped reads
  Seq sent_seq = 0;        // the member's last own user message
  bool current() const { return removed_at_seq == 0; }
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
  int64_t retention_ms = 0;  // 0: the server-wide default
  int64_t created_ms = 0;
  int64_t last_activity_ms = 0;
  std::map<UserId, Member> members;  // current and removed
  size_t current_members = 0;
  std::map<Seq, Message> messages;
  // The seqs of the stored user messages, ascending (appended as they are stored, dropped from
  // the front with them): an unread count is two binary searches, not a walk.
  std::deque<Seq> user_seqs;
  std::map<std::pair<UserId, DeviceId>, Watermarks> cursors;  // per (user, device)
  // The highest lowest watermarks the members were told (see server::LowestMove).
  server::LowestMarks lowest_told;
};

// A member's watermarks: the highest over its devices.
Watermarks Highest(const Conversation& c, const UserId& user) {
  Watermarks highest;
  for (auto it = c.cursors.lower_bound({user, DeviceId()});
       it != c.cursors.end() && it->first.first == user; ++it) {
    highest.delivered_seq = std::max(highest.delivered_seq, it->second.delivered_seq);
    highest.read_seq = std::max(highest.read_seq, it->second.read_seq);
  }
  return highest;
}

struct StoredPushToken {
  std::string platform;
  std::string token;
  int64_t registered_ms = 0;
};

struct Data {
  ConversationId next_id = 1;
  std::map<ConversationId, Conversation> conversations;
  std::map<std::pair<UserId, UserId>, ConversationId> direct;  // (low, high)
  std::map<UserId, std::set<ConversationId>> by_user;
  // Idempotency keys (sender, client_msg_id): where the message is, and once retention deleted
  // it (gone_ms > 0), its id and time until the resend window is over.
  using KeyId = std::pair<UserId, std::string>;
  struct Key {
    ConversationId conversation_id = 0;
    Seq seq = 0;
    MessageId message_id = 0;
    int64_t server_time_ms = 0;
    int64_t gone_ms = 0;
  };
  std::map<KeyId, Key> keys;
  std::multimap<int64_t, KeyId> buried;  // the keys whose message is deleted, by gone_ms
  std::map<UserId, int64_t> last_seen;   // presence: Unix ms
  std::map<UserId, std::map<DeviceId, StoredPushToken>> push_tokens;
};

class MemorySource final : public server::ReadSource {
 public:
  explicit MemorySource(const Data* data) : data_(data) {}

  Status UserConversations(const UserId& user, std::vector<ConversationHead>* out) override {
    auto it = data_->by_user.find(user);
    if (it == data_->by_user.end()) return Status::Ok();
    for (ConversationId id : it->second) {
      ConversationHead head = RawHead(id);
      const Member& m = data_->conversations.at(id).members.at(user);
      head.joined_seq = m.joined_seq;
      head.removed_at_seq = m.removed_at_seq;
      out->push_back(head);
    }
    return Status::Ok();
  }

  Result<server::Membership> GetMembership(ConversationId conversation_id,
                                           const UserId& user) override {
    server::Membership out;
    auto it = data_->conversations.find(conversation_id);
    if (it == data_->conversations.end()) return out;
    out.exists = true;
    out.kind = it->second.kind;
    auto member = it->second.members.find(user);
    if (member == it->second.members.end()) return out;
    out.role = member->second.role;
    out.joined_seq = member->second.joined_seq;
    out.removed_at_seq = member->second.removed_at_seq;
    return out;
  }

  Result<ConversationHead> Head(ConversationId conversation_id) override {
    return RawHead(conversation_id);
  }

  Result<ConversationInfo> Describe(ConversationId conversation_id, const UserId& user,
                                    const DeviceId& device, bool count_unread) override {
    const Conversation& c = data_->conversations.at(conversation_id);
    const Member& member = c.members.at(user);
    ConversationInfo info;
    info.conversation_id = conversation_id;
    info.kind = c.kind;
    info.title = c.title;
    if (c.kind == ConversationKind::kDirect) {
      for (const auto& [other, unused] : c.members) {
        if (other != user) info.peer = other;
      }
      info.peer_last_seen_ms = StoredLastSeen(info.peer);
    }
    info.last_seq = c.last_seq;
    if (member.removed_at_seq != 0) info.last_seq = std::min(info.last_seq, member.removed_at_seq);
    info.removed_at_seq = member.removed_at_seq;
    for (auto it = c.cursors.lower_bound({user, DeviceId()});
         it != c.cursors.end() && it->first.first == user; ++it) {
      info.read_seq = std::max(info.read_seq, it->second.read_seq);
      if (it->first.second == device) info.delivered_seq = it->second.delivered_seq;
    }
    // Whoever replies has seen what came before: counting starts above the user's own message,
    // so every user message counted is somebody else's.
    const Seq from = std::max({info.read_seq + 1, member.joined_seq, member.sent_seq + 1});
    if (count_unread && from <= info.last_seq) {
      info.unread = static_cast<uint64_t>(
          std::upper_bound(c.user_seqs.begin(), c.user_seqs.end(), info.last_seq) -
          std::lower_bound(c.user_seqs.begin(), c.user_seqs.end(), from));
    }
    // Nothing a removed member may read is stored any more: say so, not what came later.
    info.first_seq = c.first_seq > info.last_seq ? 0 : c.first_seq;
    info.role = member.role;
    info.member_count = static_cast<uint32_t>(c.current_members);
    info.last_activity_ms = c.last_activity_ms;
    info.retention_ms = c.retention_ms;
    // A channel keeps no lowest marks, and a removed member is told nothing of the members.
    if (member.removed_at_seq == 0) {
      info.delivered_all_seq = c.lowest_told.delivered_seq;
      info.read_all_seq = c.lowest_told.read_seq;
    }
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

  Status Watermarks(ConversationId conversation_id, const UserId& only,
                    std::vector<MemberReceipt>* out) override {
    const Conversation& c = data_->conversations.at(conversation_id);
    auto add = [&](const UserId& user, const Member& member) {
      if (only.empty() && !member.current()) return;
      const auto highest = Highest(c, user);
      out->push_back(MemberReceipt{user, member.role, highest.delivered_seq, highest.read_seq});
    };
    if (!only.empty()) {
      auto it = c.members.find(only);
      if (it != c.members.end()) add(it->first, it->second);
      return Status::Ok();
    }
    for (const auto& [user, member] : c.members) add(user, member);
    return Status::Ok();
  }

  Result<bool> SharesConversation(const UserId& a, const UserId& b) override {
    auto it = data_->by_user.find(a);
    if (it == data_->by_user.end()) return false;
    for (ConversationId id : it->second) {
      const Conversation& c = data_->conversations.at(id);
      if (c.kind != ConversationKind::kDirect && c.kind != ConversationKind::kGroup) continue;
      auto mine = c.members.find(a);
      auto theirs = c.members.find(b);
      if (mine != c.members.end() && mine->second.current() && theirs != c.members.end() &&
          theirs->second.current()) {
        return true;
      }
    }
    return false;
  }

  Result<int64_t> LastSeen(const UserId& user) override { return StoredLastSeen(user); }

  Status PushTokens(const UserId& user, std::vector<PushToken>* out) override {
    auto it = data_->push_tokens.find(user);
    if (it == data_->push_tokens.end()) return Status::Ok();
    for (const auto& [device, stored] : it->second) {
      out->push_back(PushToken{device, stored.platform, stored.token});
    }
    return Status::Ok();
  }

 private:
  int64_t StoredLastSeen(const UserId& user) const {
    auto it = data_->last_seen.find(user);
    return it == data_->last_seen.end() ? 0 : it->second;
  }

  ConversationHead RawHead(ConversationId id) const {
    const Conversation& c = data_->conversations.at(id);
    return ConversationHead{id, c.last_seq, c.first_seq, 0, 0};
  }

  const Data* data_;
};

class MemoryTarget final : public server::AppendTarget {
 public:
  explicit MemoryTarget(Data* data) : data_(data), reader_(data) {}

  server::ReadSource& Reader() override { return reader_; }

  Result<std::optional<Message>> FindByKey(const UserId& sender,
                                           const std::string& client_msg_id) override {
    auto it = data_->keys.find({sender, client_msg_id});
    if (it == data_->keys.end()) return std::optional<Message>();
    const Data::Key& key = it->second;
    if (key.gone_ms > 0) {
      return std::optional<Message>(server::DeletedMessage(
          key.conversation_id, key.seq, key.message_id, sender, client_msg_id, key.server_time_ms));
    }
    return std::optional<Message>(
        data_->conversations.at(key.conversation_id).messages.at(key.seq));
  }

  Result<ConversationId> FindDirect(const UserId& low, const UserId& high) override {
    auto it = data_->direct.find({low, high});
    return it == data_->direct.end() ? ConversationId{0} : it->second;
  }

  Result<ConversationId> CreateDirect(const UserId& low, const UserId& high,
                                      int64_t now_ms) override {
    Result<ConversationId> id = CreateGroup(ConversationKind::kDirect, "", now_ms);
    if (Status s = PutMember(*id, low, Role::kMember, 0); !s.ok()) return s;
    if (Status s = PutMember(*id, high, Role::kMember, 0); !s.ok()) return s;
    data_->direct[{low, high}] = *id;
    return id;
  }

  Result<ConversationId> CreateGroup(ConversationKind kind, const std::string& title,
                                     int64_t now_ms) override {
    const ConversationId id = data_->next_id++;
    Conversation& c = data_->conversations[id];
    c.kind = kind;
    c.title = title;
    c.created_ms = now_ms;
    c.last_activity_ms = now_ms;
    return id;
  }

  Status SetTitle(ConversationId conversation_id, const std::string& title) override {
    data_->conversations.at(conversation_id).title = title;
    return Status::Ok();
  }

  Status PutMember(ConversationId conversation_id, const UserId& user, Role role,
                   Seq joined_seq) override {
    Conversation& c = data_->conversations.at(conversation_id);
    Member& m = c.members[user];
    // A row created just now by operator[] is not in by_user yet, so it counts as new.
    const bool was_current = data_->by_user[user].contains(conversation_id) && m.current();
    m.role = role;
    m.joined_seq = joined_seq;
    m.removed_at_seq = 0;
    if (!was_current) ++c.current_members;
    data_->by_user[user].insert(conversation_id);
    return Status::Ok();
  }

  Status SetRole(ConversationId conversation_id, const UserId& user, Role role) override {
    data_->conversations.at(conversation_id).members.at(user).role = role;
    return Status::Ok();
  }

  Status RemoveMember(ConversationId conversation_id, const UserId& user, Seq seq) override {
    Conversation& c = data_->conversations.at(conversation_id);
    Member& m = c.members.at(user);
    if (m.current()) --c.current_members;
    m.removed_at_seq = seq;
    return Status::Ok();
  }

  Result<uint64_t> MemberCount(ConversationId conversation_id) override {
    return uint64_t{data_->conversations.at(conversation_id).current_members};
  }

  Status PutCursor(ConversationId conversation_id, const UserId& user, const DeviceId& device,
                   Seq delivered_seq, Seq read_seq) override {
    data_->conversations.at(conversation_id).cursors[{user, device}] =
        Watermarks{delivered_seq, read_seq};
    return Status::Ok();
  }

  // Walks the members every time: the memory store keeps nothing between calls.
  Result<server::LowestMove> MoveLowest(ConversationId conversation_id, const UserId& user,
                                        const MemberReceipt& /*before*/,
                                        const MemberReceipt& after) override {
    std::vector<MemberReceipt> members;
    if (Status s = Reader().Watermarks(conversation_id, UserId(), &members); !s.ok()) return s;
    const Conversation& c = data_->conversations.at(conversation_id);
    for (MemberReceipt& member : members) {
      const Seq joined_seq = c.members.at(member.user).joined_seq;
      member = server::CountedFromJoin(std::move(member), joined_seq);
    }
    server::LowestMove move;
    move.after = server::CountLowest(members, user, after).marks;
    move.news = server::RaiseTold(data_->conversations.at(conversation_id).lowest_told, move.after);
    return move;
  }

  Result<Seq> LastSeq(ConversationId conversation_id) override {
    return data_->conversations.at(conversation_id).last_seq;
  }

  Status Insert(const Message& message) override {
    if (!message.client_msg_id.empty() &&
        data_->keys.contains({message.sender, message.client_msg_id})) {
      return AlreadyExists("client_msg_id is already stored for this sender");
    }
    Conversation& c = data_->conversations.at(message.conversation_id);
    c.messages[message.seq] = message;
    c.last_seq = message.seq;
    if (c.first_seq == 0) c.first_seq = message.seq;
    c.last_activity_ms = message.server_time_ms;
    if (message.kind == MessageKind::kUser) {
      c.user_seqs.push_back(message.seq);
      if (auto member = c.members.find(message.sender); member != c.members.end()) {
        member->second.sent_seq = message.seq;
      }
    }
    if (!message.client_msg_id.empty()) {
      Data::Key& key = data_->keys[{message.sender, message.client_msg_id}];
      key.conversation_id = message.conversation_id;
      key.seq = message.seq;
    }
    return Status::Ok();
  }

  Result<std::vector<UserId>> Members(ConversationId conversation_id) override {
    std::vector<UserId> out;
    for (const auto& [user, member] : data_->conversations.at(conversation_id).members) {
      if (member.current()) out.push_back(user);
    }
    return out;
  }

  Status PutLastSeen(const UserId& user, int64_t last_seen_ms) override {
    int64_t& stored = data_->last_seen[user];
    stored = std::max(stored, last_seen_ms);
    return Status::Ok();
  }

  Status SetConversationRetention(ConversationId conversation_id, int64_t retention_ms) override {
    data_->conversations.at(conversation_id).retention_ms = retention_ms;
    return Status::Ok();
  }

  Status PutPushToken(const UserId& user, const DeviceId& device, const std::string& platform,
                      const std::string& token, int64_t now_ms, uint32_t max_devices) override {
    std::map<DeviceId, StoredPushToken>& tokens = data_->push_tokens[user];
    tokens[device] = StoredPushToken{platform, token, now_ms};
    // The least recently registered other device goes first, ties by device id, as in SQLite.
    while (max_devices != 0 && tokens.size() > max_devices) {
      auto oldest = tokens.end();
      for (auto it = tokens.begin(); it != tokens.end(); ++it) {
        if (it->first == device) continue;
        if (oldest == tokens.end() || it->second.registered_ms < oldest->second.registered_ms) {
          oldest = it;
        }
      }
      tokens.erase(oldest);
    }
    return Status::Ok();
  }

  Status DeletePushToken(const UserId& user, const DeviceId& device) override {
    auto it = data_->push_tokens.find(user);
    if (it == data_->push_tokens.end()) return Status::Ok();
    it->second.erase(device);
    if (it->second.empty()) data_->push_tokens.erase(it);
    return Status::Ok();
  }

 private:
  Data* data_;
  MemorySource reader_;
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

  void SyncMany(std::span<const SyncQuery> queries, const SyncDone& done) override {
    std::lock_guard lock(mu_);
    MemorySource source(&data_);
    server::RunSyncMany(source, queries, done);
  }

  Result<HistoryReply> History(const HistoryQuery& query) override {
    std::lock_guard lock(mu_);
    MemorySource source(&data_);
    return server::RunHistory(source, query);
  }

  Result<ReceiptsReply> Receipts(const ReceiptsQuery& query) override {
    std::lock_guard lock(mu_);
    MemorySource source(&data_);
    return server::RunReceipts(source, query);
  }

  Result<PresenceReply> Presence(const PresenceQuery& query) override {
    std::lock_guard lock(mu_);
    MemorySource source(&data_);
    return server::RunPresence(source, query);
  }

  Result<SweepResult> DeleteExpired(const SweepRequest& request) override {
    if (Status s = server::ValidateSweep(request); !s.ok()) return s;
    std::lock_guard lock(mu_);
    SweepResult result;
    const int64_t dropped_until = request.now_ms - request.resend_window_ms;
    while (!data_.buried.empty() && data_.buried.begin()->first <= dropped_until) {
      data_.keys.erase(data_.buried.begin()->second);
      data_.buried.erase(data_.buried.begin());
      // A pass that used its whole bound on keys says more may remain, as the SQLite store does.
      if (++result.keys_dropped == request.max_messages) {
        result.has_more = true;
        return result;
      }
    }
    for (auto& [id, c] : data_.conversations) {
      const int64_t ttl = server::EffectiveRetention(c.retention_ms, request.default_retention_ms);
      if (ttl <= 0) continue;
      const int64_t cutoff = request.now_ms - ttl;
      Seq through = 0;  // the last seq deleted here
      // Only the oldest run goes, so the stored range stays contiguous even if the clock that
      // stamped the messages stepped back.
      while (!c.messages.empty() && c.messages.begin()->second.server_time_ms < cutoff) {
        if (result.deleted + result.keys_dropped == request.max_messages) {
          result.has_more = true;
          break;
        }
        const Message& m = c.messages.begin()->second;
        auto key = m.client_msg_id.empty() ? data_.keys.end()
                                           : data_.keys.find({m.sender, m.client_msg_id});
        if (key != data_.keys.end() && request.resend_window_ms == 0) {
          data_.keys.erase(key);
        } else if (key != data_.keys.end()) {
          key->second.message_id = m.message_id;
          key->second.server_time_ms = m.server_time_ms;
          key->second.gone_ms = server::KeyGoneMs(request.now_ms);
          data_.buried.emplace(key->second.gone_ms, key->first);
        }
        if (!c.user_seqs.empty() && c.user_seqs.front() == c.messages.begin()->first) {
          c.user_seqs.pop_front();
        }
        through = c.messages.begin()->first;
        c.messages.erase(c.messages.begin());
        ++result.deleted;
      }
      c.first_seq = c.messages.empty() ? 0 : c.messages.begin()->first;
      if (through != 0) {
        ExpiredRange& range = result.expired.emplace_back();
        range.conversation_id = id;
        range.kind = c.kind;
        range.first_seq = c.first_seq;
        range.up_to_seq = through;
        if (c.kind != ConversationKind::kChannel) {
          for (const auto& [user, member] : c.members) {
            if (member.current()) range.recipients.push_back(user);
          }
        }
      }
      if (result.has_more) break;
    }
    return result;
  }

  Status SetRetention(ConversationId conversation_id, int64_t retention_ms) override {
    if (Status s = server::CheckRetention(retention_ms); !s.ok()) return s;
    std::lock_guard lock(mu_);
    auto it = data_.conversations.find(conversation_id);
    if (it == data_.conversations.end()) {
      return NotFound("conversation " + std::to_string(conversation_id) + " does not exist");
    }
    it->second.retention_ms = retention_ms;
    return Status::Ok();
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

  Result<std::vector<PushTarget>> PushTargets(std::span<const UserId> users) override {
    std::lock_guard lock(mu_);
    MemorySource source(&data_);
    return server::RunPushTargets(source, users);
  }

 private:
  const uint64_t epoch_;
  std::mutex mu_;
  Data data_;  // guarded by mu_
};

}  // namespace

std::shared_ptr<MessageStore> NewMemoryStore() { return std::make_shared<MemoryStore>(); }

}  // namespace chat
