#include "src/server/store_common.h"

#include <algorithm>
#include <map>
#include <string>
#include <utility>

namespace chat::server {

Status NotAMember(ConversationId conversation_id) {
  return PermissionDenied("not a member of conversation " + std::to_string(conversation_id));
}

Status AppendOne(AppendTarget& target, const AppendRequest& request, AppendResult* result) {
  *result = AppendResult{};
  if (request.sender.empty()) {
    result->status = InvalidArgument("sender is required");
    return Status::Ok();
  }
  if (request.conversation_id == 0) {
    if (request.peer.empty()) {
      result->status = InvalidArgument("peer is required when conversation_id is 0");
      return Status::Ok();
    }
    if (request.peer == request.sender) {
      result->status = InvalidArgument("peer must not be the sender");
      return Status::Ok();
    }
  }

  // The idempotency key is checked before anything else is resolved, so a resend never
  // creates a conversation and is answered even if the conversation changed since. An empty
  // key opts out of deduplication (the server's own system messages have none).
  if (!request.client_msg_id.empty()) {
    Result<std::optional<Message>> original =
        target.FindByKey(request.sender, request.client_msg_id);
    if (!original.ok()) return original.status();
    if (original->has_value()) {
      result->message = std::move(**original);
      result->duplicate = true;
      Result<std::vector<UserId>> members = target.Members(result->message.conversation_id);
      if (!members.ok()) return members.status();
      result->recipients = std::move(*members);
      return Status::Ok();
    }
  }

  ConversationId conversation_id = request.conversation_id;
  if (conversation_id == 0) {
    const auto& [low, high] = std::minmax(request.sender, request.peer);
    Result<ConversationId> found = target.FindDirect(low, high);
    if (!found.ok()) return found.status();
    conversation_id = *found;
    if (conversation_id == 0) {
      Result<ConversationId> created = target.CreateDirect(low, high, request.server_time_ms);
      if (!created.ok()) return created.status();
      conversation_id = *created;
      result->created = true;
    }
  } else {
    Result<bool> member = target.IsMember(conversation_id, request.sender);
    if (!member.ok()) return member.status();
    if (!*member) {
      result->status = NotAMember(conversation_id);
      return Status::Ok();
    }
  }

  Result<Seq> last_seq = target.LastSeq(conversation_id);
  if (!last_seq.ok()) return last_seq.status();

  Message& message = result->message;
  message.conversation_id = conversation_id;
  message.seq = *last_seq + 1;
  message.message_id = request.message_id;
  message.sender = request.sender;
  message.sender_device = request.sender_device;
  message.client_msg_id = request.client_msg_id;
  message.server_time_ms = request.server_time_ms;
  message.kind = request.kind;
  message.content_type = request.content_type;
  message.body = request.body;
  message.attachments = request.attachments;
  if (Status s = target.Insert(message); !s.ok()) return s;

  Result<std::vector<UserId>> members = target.Members(conversation_id);
  if (!members.ok()) return members.status();
  result->recipients = std::move(*members);
  return Status::Ok();
}

// Conversations are visited in id order and each contributes its missing messages in seq
// order until `limit` is reached. A conversation is listed in `conversations` only when the
// reply carries at least one of its messages or a gap for it: its ConversationInfo then
// describes exactly what the client is about to apply. Conversations after the cut are not
// listed; has_more tells the client to sync again with advanced cursors, and they come then.
Result<SyncReply> RunSync(ReadSource& source, const SyncQuery& query) {
  if (query.limit == 0) return InvalidArgument("limit must be at least 1");
  if (query.catchup_max == 0) return InvalidArgument("catchup_max must be at least 1");

  // A client may repeat a conversation; its highest claim wins.
  std::map<ConversationId, Seq> cursors;
  for (const Cursor& cursor : query.cursors) {
    Seq& seq = cursors[cursor.conversation_id];
    seq = std::max(seq, cursor.seq);
  }

  std::vector<ConversationHead> heads;
  if (Status s = source.UserConversations(query.user, &heads); !s.ok()) return s;

  SyncReply reply;
  for (const ConversationHead& head : heads) {
    auto it = cursors.find(head.conversation_id);
    const Seq cursor = it == cursors.end() ? 0 : it->second;
    if (head.last_seq <= cursor) continue;
    if (reply.messages.size() >= query.limit) {
      reply.has_more = true;
      break;
    }

    Seq start = cursor + 1;
    if (head.last_seq - cursor > query.catchup_max) start = head.last_seq - query.catchup_max + 1;
    // Retention may have removed the oldest messages; everything stored was removed when
    // first_seq is 0 while last_seq is not.
    const Seq first_stored = head.first_seq == 0 ? head.last_seq + 1 : head.first_seq;
    start = std::max(start, first_stored);
    if (start > cursor + 1) reply.gaps.push_back({head.conversation_id, cursor + 1, start - 1});

    const size_t room = query.limit - reply.messages.size();
    const size_t before = reply.messages.size();
    if (start <= head.last_seq) {
      if (Status s = source.ReadAscending(head.conversation_id, start, head.last_seq, room,
                                          &reply.messages);
          !s.ok()) {
        return s;
      }
    }
    Result<ConversationInfo> info = source.Describe(head.conversation_id, query.user, query.device);
    if (!info.ok()) return info.status();
    reply.conversations.push_back(std::move(*info));

    const size_t added = reply.messages.size() - before;
    if (added == room && reply.messages.back().seq < head.last_seq) {
      reply.has_more = true;
      break;
    }
  }
  return reply;
}

Result<HistoryReply> RunHistory(ReadSource& source, const HistoryQuery& query) {
  if (query.limit == 0) return InvalidArgument("limit must be at least 1");
  Result<std::optional<ConversationHead>> head =
      source.MemberHead(query.conversation_id, query.user);
  if (!head.ok()) return head.status();
  if (!head->has_value()) return NotAMember(query.conversation_id);

  const ConversationHead& h = **head;
  const Seq before =
      query.before_seq == 0 || query.before_seq > h.last_seq ? h.last_seq + 1 : query.before_seq;
  HistoryReply reply;
  reply.first_seq = h.first_seq;
  if (Status s = source.ReadDescending(h.conversation_id, before, query.limit, &reply.messages);
      !s.ok()) {
    return s;
  }
  reply.has_more = !reply.messages.empty() && reply.messages.back().seq > h.first_seq;
  return reply;
}

}  // namespace chat::server
