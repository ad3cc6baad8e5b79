#include "src/server/store_common.h"

#include <algorithm>
#include <limits>
#include <map>
#include <string>
#include <utility>

namespace chat {

Result<SweepResult> MessageStore::DeleteExpired(const SweepRequest& /*request*/) {
  return FailedPrecondition("this store does not support retention");
}

Status MessageStore::SetRetention(ConversationId /*conversation_id*/, int64_t /*retention_ms*/) {
  return FailedPrecondition("this store does not support retention");
}

Result<PresenceReply> MessageStore::Presence(const PresenceQuery& /*query*/) {
  return FailedPrecondition("this store does not support presence");
}

Result<std::vector<PushTarget>> MessageStore::PushTargets(std::span<const UserId> /*users*/) {
  return FailedPrecondition("this store does not support push tokens");
}

void MessageStore::SyncMany(std::span<const SyncQuery> queries, const SyncDone& done) {
  for (size_t i = 0; i < queries.size(); ++i) done(i, Sync(queries[i]));
}

}  // namespace chat

namespace chat::server {

Status NotAMember(ConversationId conversation_id) {
  return PermissionDenied("not a member of conversation " + std::to_string(conversation_id));
}

Status Authorize(ConversationId conversation_id, const Membership& membership, Access access) {
  if (!membership.exists || membership.role == Role::kUnspecified) {
    return NotAMember(conversation_id);
  }
  if (access == Access::kRead) return Status::Ok();
  if (membership.removed_at_seq != 0) return NotAMember(conversation_id);
  if (access == Access::kAdmin && membership.role != Role::kAdmin) {
    return PermissionDenied("only admins of conversation " + std::to_string(conversation_id) +
                            " may do this");
  }
  return Status::Ok();
}

namespace {

// Checks a list of user ids from a request and returns it sorted and without duplicates or
// `exclude`.
Result<std::vector<UserId>> CleanUsers(const std::vector<UserId>& users, const UserId& exclude) {
  std::vector<UserId> out;
  for (const UserId& user : users) {
    if (user.empty() || user.size() > kMaxUserIdBytes) {
      return InvalidArgument("user ids must be 1..128 bytes");
    }
    if (user != exclude) out.push_back(user);
  }
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

Status CheckTitle(const std::string& title) {
  if (title.size() > kMaxTitleBytes) return InvalidArgument("title must be at most 256 bytes");
  return Status::Ok();
}

uint32_t MemberCap(const AppendRequest& request, ConversationKind kind) {
  return kind == ConversationKind::kChannel ? request.max_channel_members
                                            : request.max_group_members;
}

Status TooManyMembers(uint32_t max_members) {
  return ResourceExhausted("a conversation of this kind has at most " +
                           std::to_string(max_members) + " members");
}

// Inserts a system message at the conversation's next seq.
Result<Message> InsertSystem(AppendTarget& target, const AppendRequest& request,
                             ConversationId conversation_id, SystemEvent event,
                             MessageId message_id) {
  Result<Seq> last_seq = target.LastSeq(conversation_id);
  if (!last_seq.ok()) return last_seq.status();
  Message message;
  message.conversation_id = conversation_id;
  message.seq = *last_seq + 1;
  message.message_id = message_id;
  message.server_time_ms = request.server_time_ms;
  message.kind = MessageKind::kSystem;
  message.system = std::move(event);
  if (Status s = target.Insert(message); !s.ok()) return s;
  return message;
}

// Who gets a committed message live (see AppendResult::recipients).
Status SetRecipients(AppendTarget& target, ConversationKind kind, const Message& message,
                     AppendResult* result) {
  result->kind = kind;
  std::vector<UserId> recipients;
  if (kind == ConversationKind::kChannel) {
    if (message.kind == MessageKind::kSystem) {
      recipients = message.system.users;
      if (!message.system.actor.empty()) recipients.push_back(message.system.actor);
    }
  } else {
    Result<std::vector<UserId>> members = target.Members(message.conversation_id);
    if (!members.ok()) return members.status();
    recipients = std::move(*members);
    if (result->removed.empty()) {
      // Members are listed ascending and once each already (a group's 500 need no sort).
      result->recipients = std::move(recipients);
      return Status::Ok();
    }
  }
  recipients.insert(recipients.end(), result->removed.begin(), result->removed.end());
  std::sort(recipients.begin(), recipients.end());
  recipients.erase(std::unique(recipients.begin(), recipients.end()), recipients.end());
  result->recipients = std::move(recipients);
  return Status::Ok();
}

// When `request`'s sender already stored a message under its client_msg_id, answers with that
// message (duplicate, its recipients as they are now) and returns true. An empty key opts out
// of deduplication (the server's own system messages have none): false.
Result<bool> AnswerResend(AppendTarget& target, const AppendRequest& request,
                          AppendResult* result) {
  if (request.client_msg_id.empty()) return false;
  Result<std::optional<Message>> original = target.FindByKey(request.sender, request.client_msg_id);
  if (!original.ok()) {
    // A key whose message is not stored or does not decode fails this request alone: the
    // lookup wrote nothing, so the other requests of the batch still commit. (When SQLite
    // found the file itself damaged, it refuses the batch's COMMIT.)
    if (original.status().code() != Code::kDataLoss) return original.status();
    *result = AppendResult{};
    result->status = original.status();
    return true;
  }
  if (!original->has_value()) return false;
  *result = AppendResult{};
  result->message = std::move(**original);
  result->duplicate = true;
  Result<Membership> membership =
      target.Reader().GetMembership(result->message.conversation_id, request.sender);
  if (!membership.ok()) return membership.status();
  if (Status s = SetRecipients(target, membership->kind, result->message, result); !s.ok()) {
    return s;
  }
  return true;
}

Status AppendUserMessage(AppendTarget& target, const AppendRequest& request, AppendResult* result) {
  if (request.conversation_id == 0) {
    if (request.peer.empty()) {
      result->status = InvalidArgument("peer is required when conversation_id is 0");
      return Status::Ok();
    }
    if (request.peer == request.sender) {
      result->status = InvalidArgument("peer must not be the sender");
      return Status::Ok();
    }
    if (request.peer.size() > kMaxUserIdBytes) {
      result->status = InvalidArgument("user ids must be 1..128 bytes");
      return Status::Ok();
    }
  }

  // A resend (same sender and client_msg_id) is answered with the original, even if the
  // conversation changed since. The key is not looked up first: the insert refuses a stored
  // key, and only the paths that would answer something else (a refusal, a new conversation)
  // look it up before they do.
  ConversationId conversation_id = request.conversation_id;
  ConversationKind kind = ConversationKind::kDirect;
  if (conversation_id == 0) {
    const auto& [low, high] = std::minmax(request.sender, request.peer);
    Result<ConversationId> found = target.FindDirect(low, high);
    if (!found.ok()) return found.status();
    conversation_id = *found;
    if (conversation_id == 0) {
      // The key may name a message of another conversation: a resend creates nothing.
      Result<bool> resent = AnswerResend(target, request, result);
      if (!resent.ok() || *resent) return resent.status();
      Result<ConversationId> created = target.CreateDirect(low, high, request.server_time_ms);
      if (!created.ok()) return created.status();
      conversation_id = *created;
      result->created = true;
    }
  } else {
    Result<Membership> membership = target.Reader().GetMembership(conversation_id, request.sender);
    if (!membership.ok()) return membership.status();
    if (Status s = Authorize(conversation_id, *membership, Access::kMember); !s.ok()) {
      Result<bool> resent = AnswerResend(target, request, result);
      if (!resent.ok() || *resent) return resent.status();
      result->status = s;
      return Status::Ok();
    }
    kind = membership->kind;
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
  message.kind = MessageKind::kUser;
  message.content_type = request.content_type;
  message.body = request.body;
  message.attachments = request.attachments;
  if (Status s = target.Insert(message); !s.ok()) {
    if (s.code() != Code::kAlreadyExists) return s;
    Result<bool> resent = AnswerResend(target, request, result);
    if (!resent.ok()) return resent.status();
    if (!*resent) return Internal("the insert refused a client_msg_id that is not stored");
    return Status::Ok();
  }
  return SetRecipients(target, kind, message, result);
}

Status CreateGroup(AppendTarget& target, const AppendRequest& request, AppendResult* result) {
  if (request.group_kind != ConversationKind::kGroup &&
      request.group_kind != ConversationKind::kChannel) {
    result->status = InvalidArgument("kind must be GROUP or CHANNEL");
    return Status::Ok();
  }
  if (Status s = CheckTitle(request.title); !s.ok()) {
    result->status = s;
    return Status::Ok();
  }
  Result<std::vector<UserId>> users = CleanUsers(request.users, request.sender);
  if (!users.ok()) {
    result->status = users.status();
    return Status::Ok();
  }
  const uint32_t cap = MemberCap(request, request.group_kind);
  if (cap != 0 && users->size() + 1 > cap) {
    result->status = TooManyMembers(cap);
    return Status::Ok();
  }
  Result<ConversationId> id =
      target.CreateGroup(request.group_kind, request.title, request.server_time_ms);
  if (!id.ok()) return id.status();
  if (Status s = target.PutMember(*id, request.sender, Role::kAdmin, 1); !s.ok()) return s;
  for (const UserId& user : *users) {
    if (Status s = target.PutMember(*id, user, Role::kMember, 1); !s.ok()) return s;
  }
  SystemEvent event;
  event.type = SystemEvent::Type::kCreated;
  event.actor = request.sender;
  event.users = *users;
  event.title = request.title;
  Result<Message> message =
      InsertSystem(target, request, *id, std::move(event), request.message_id);
  if (!message.ok()) return message.status();
  result->message = std::move(*message);
  result->created = true;
  Result<ConversationInfo> info =
      target.Reader().Describe(*id, request.sender, request.sender_device);
  if (!info.ok()) return info.status();
  result->conversation = std::move(*info);
  return SetRecipients(target, request.group_kind, result->message, result);
}

// The longest-standing current member (lowest joined_seq, then user id), if any.
Result<std::optional<UserId>> LongestStanding(AppendTarget& target,
                                              ConversationId conversation_id) {
  std::vector<MemberReceipt> members;
  if (Status s = target.Reader().Watermarks(conversation_id, "", &members); !s.ok()) return s;
  std::optional<UserId> best;
  Seq best_joined = 0;
  for (const MemberReceipt& member : members) {
    Result<Membership> m = target.Reader().GetMembership(conversation_id, member.user);
    if (!m.ok()) return m.status();
    if (!best || m->joined_seq < best_joined) {
      best = member.user;
      best_joined = m->joined_seq;
    }
  }
  return best;
}

Result<bool> HasAdmin(AppendTarget& target, ConversationId conversation_id) {
  std::vector<MemberReceipt> members;
  if (Status s = target.Reader().Watermarks(conversation_id, "", &members); !s.ok()) return s;
  return std::any_of(members.begin(), members.end(),
                     [](const MemberReceipt& m) { return m.role == Role::kAdmin; });
}

Status ChangeGroup(AppendTarget& target, const AppendRequest& request, AppendResult* result) {
  const ConversationId id = request.conversation_id;
  Result<Membership> actor = target.Reader().GetMembership(id, request.sender);
  if (!actor.ok()) return actor.status();
  const Access access = request.op == ConversationOp::kLeave ? Access::kMember : Access::kAdmin;
  if (Status s = Authorize(id, *actor, access); !s.ok()) {
    result->status = s;
    return Status::Ok();
  }
  if (actor->kind == ConversationKind::kDirect) {
    result->status = FailedPrecondition("a direct conversation has fixed members and no title");
    return Status::Ok();
  }
  Result<Seq> last_seq = target.LastSeq(id);
  if (!last_seq.ok()) return last_seq.status();
  const Seq seq = *last_seq + 1;

  SystemEvent event;
  event.actor = request.sender;
  bool check_admins = false;
  switch (request.op) {
    case ConversationOp::kRename: {
      if (request.title.empty()) {
        result->status = InvalidArgument("title is required");
        return Status::Ok();
      }
      if (Status s = CheckTitle(request.title); !s.ok()) {
        result->status = s;
        return Status::Ok();
      }
      if (Status s = target.SetTitle(id, request.title); !s.ok()) return s;
      event.type = SystemEvent::Type::kRenamed;
      event.title = request.title;
      break;
    }
    case ConversationOp::kAddMembers: {
      Result<std::vector<UserId>> users = CleanUsers(request.users, "");
      if (!users.ok()) {
        result->status = users.status();
        return Status::Ok();
      }
      std::vector<UserId> added;
      for (const UserId& user : *users) {
        Result<Membership> m = target.Reader().GetMembership(id, user);
        if (!m.ok()) return m.status();
        const bool current = m->role != Role::kUnspecified && m->removed_at_seq == 0;
        if (!current) added.push_back(user);
      }
      if (added.empty()) {
        result->status = AlreadyExists("every user is already a member");
        return Status::Ok();
      }
      Result<uint64_t> count = target.MemberCount(id);
      if (!count.ok()) return count.status();
      const uint32_t cap = MemberCap(request, actor->kind);
      if (cap != 0 && *count + added.size() > cap) {
        result->status = TooManyMembers(cap);
        return Status::Ok();
      }
      for (const UserId& user : added) {
        if (Status s = target.PutMember(id, user, Role::kMember, seq); !s.ok()) return s;
      }
      event.type = SystemEvent::Type::kMembersAdded;
      event.users = std::move(added);
      break;
    }
    case ConversationOp::kRemoveMembers:
    case ConversationOp::kLeave: {
      std::vector<UserId> users;
      // Only an admin's going can leave the conversation without one (the check reads every
      // member: a channel's million, for each plain member who leaves, would stall the writer).
      bool admin_goes = false;
      if (request.op == ConversationOp::kLeave) {
        users.push_back(request.sender);
        admin_goes = actor->role == Role::kAdmin;
      } else {
        Result<std::vector<UserId>> clean = CleanUsers(request.users, "");
        if (!clean.ok()) {
          result->status = clean.status();
          return Status::Ok();
        }
        for (const UserId& user : *clean) {
          Result<Membership> m = target.Reader().GetMembership(id, user);
          if (!m.ok()) return m.status();
          if (m->role != Role::kUnspecified && m->removed_at_seq == 0) {
            users.push_back(user);
            admin_goes = admin_goes || m->role == Role::kAdmin;
          }
        }
        if (users.empty()) {
          result->status = NotFound("none of the users is a member");
          return Status::Ok();
        }
      }
      for (const UserId& user : users) {
        if (Status s = target.RemoveMember(id, user, seq); !s.ok()) return s;
      }
      event.type = request.op == ConversationOp::kLeave ? SystemEvent::Type::kMemberLeft
                                                        : SystemEvent::Type::kMembersRemoved;
      event.users = users;
      result->removed = std::move(users);
      check_admins = admin_goes;
      break;
    }
    case ConversationOp::kSetRole: {
      if (request.users.size() != 1 ||
          (request.role != Role::kMember && request.role != Role::kAdmin)) {
        result->status = InvalidArgument("set_role needs one user and role MEMBER or ADMIN");
        return Status::Ok();
      }
      if (Result<std::vector<UserId>> clean = CleanUsers(request.users, ""); !clean.ok()) {
        result->status = clean.status();
        return Status::Ok();
      }
      const UserId& user = request.users[0];
      Result<Membership> m = target.Reader().GetMembership(id, user);
      if (!m.ok()) return m.status();
      if (m->role == Role::kUnspecified || m->removed_at_seq != 0) {
        result->status = NotFound(user + " is not a member");
        return Status::Ok();
      }
      if (m->role == request.role) {
        result->status =
            AlreadyExists(user + (request.role == Role::kAdmin ? " is already an admin"
                                                               : " is already a member"));
        return Status::Ok();
      }
      if (m->role == Role::kAdmin && request.role == Role::kMember) {
        std::vector<MemberReceipt> members;
        if (Status s = target.Reader().Watermarks(id, "", &members); !s.ok()) return s;
        const auto admins = std::count_if(members.begin(), members.end(),
                                          [](const auto& x) { return x.role == Role::kAdmin; });
        if (admins <= 1) {
          result->status = FailedPrecondition(
              "the last admin cannot step down; promote another member first or leave");
          return Status::Ok();
        }
      }
      if (Status s = target.SetRole(id, user, request.role); !s.ok()) return s;
      event.type = SystemEvent::Type::kRoleChanged;
      event.users = {user};
      event.role = request.role;
      break;
    }
    default:
      result->status = InvalidArgument("unknown conversation operation");
      return Status::Ok();
  }

  Result<Message> message = InsertSystem(target, request, id, std::move(event), request.message_id);
  if (!message.ok()) return message.status();
  result->message = std::move(*message);

  // The last admin leaving (or removing themselves) hands the role to the longest-standing
  // member, recorded as a role change by no one, in the same transaction.
  if (check_admins) {
    Result<bool> has_admin = HasAdmin(target, id);
    if (!has_admin.ok()) return has_admin.status();
    if (!*has_admin) {
      Result<std::optional<UserId>> heir = LongestStanding(target, id);
      if (!heir.ok()) return heir.status();
      if (heir->has_value()) {
        if (Status s = target.SetRole(id, **heir, Role::kAdmin); !s.ok()) return s;
        SystemEvent promoted;
        promoted.type = SystemEvent::Type::kRoleChanged;
        promoted.users = {**heir};
        promoted.role = Role::kAdmin;
        Result<Message> follow =
            InsertSystem(target, request, id, std::move(promoted), request.spare_message_id);
        if (!follow.ok()) return follow.status();
        result->also.push_back(std::move(*follow));
      }
    }
  }
  if (Status s = SetRecipients(target, actor->kind, result->message, result); !s.ok()) return s;
  if (!result->also.empty() && actor->kind == ConversationKind::kChannel) {
    result->recipients.push_back(result->also.back().system.users[0]);
  }
  Result<ConversationInfo> info =
      target.Reader().Describe(id, request.sender, request.sender_device);
  if (!info.ok()) return info.status();
  result->conversation = std::move(*info);
  return Status::Ok();
}

Status ApplyReceipt(AppendTarget& target, const AppendRequest& request, AppendResult* result) {
  const ConversationId id = request.conversation_id;
  ReadSource& reader = target.Reader();
  Result<Membership> membership = reader.GetMembership(id, request.sender);
  if (!membership.ok()) return membership.status();
  // A removed member may still mark read what it could read (up to its removal), or its unread
  // count (and push badge) would stay above 0 for good; only its own devices are told.
  if (Status s = Authorize(id, *membership, Access::kRead); !s.ok()) {
    result->status = s;
    return Status::Ok();
  }
  result->kind = membership->kind;
  const bool removed = membership->removed_at_seq != 0;
  Result<Seq> last_seq = target.LastSeq(id);
  if (!last_seq.ok()) return last_seq.status();
  // What the user may see ends at its removal (as Describe caps it).
  const Seq last = removed ? std::min(*last_seq, membership->removed_at_seq) : *last_seq;
  Result<std::optional<DeviceMarks>> start =
      reader.ReceiptStart(id, request.sender, request.sender_device);
  if (!start.ok()) return start.status();
  if (!start->has_value()) return Internal("receipt: the member's row is gone");
  const MemberReceipt before_mark = (*start)->user;
  // Watermarks never move backwards and never past what is committed. A device that has read
  // up to a seq has also received it. The user's read mark is the highest over its devices.
  const Seq before_read = std::min(before_mark.read_seq, last);
  const Seq before_delivered = (*start)->device_delivered_seq;
  const Seq read = std::max(before_read, std::min(request.read_seq, last));
  const Seq delivered = std::max({before_delivered, std::min(request.delivered_seq, last), read});
  if (read != before_read || delivered != before_delivered) {
    if (Status s = target.PutCursor(id, request.sender, request.sender_device, delivered, read);
        !s.ok()) {
      return s;
    }
  }
  Result<ConversationInfo> after = reader.Describe(id, request.sender, request.sender_device);
  if (!after.ok()) return after.status();
  result->conversation = std::move(*after);
  result->message.conversation_id = id;
  Result<uint64_t> total =
      target.UserUnreadTotal(request.sender, request.sender_device, result->conversation);
  if (!total.ok()) return total.status();
  result->unread_total = *total;

  // The user's marks are the highest over its devices, and only this device's moved (upwards).
  result->sender_receipt = before_mark;
  result->sender_receipt.delivered_seq = std::max(before_mark.delivered_seq, delivered);
  result->sender_receipt.read_seq = std::max(before_mark.read_seq, read);
  // Others are told only when the user's own watermarks (over all devices) moved; one device
  // catching up with another changes nothing they can see.
  result->receipt_changed = before_mark.delivered_seq != result->sender_receipt.delivered_seq ||
                            before_mark.read_seq != result->sender_receipt.read_seq;
  // A channel keeps only the member's own cursors: nothing about others is read or told. Nor
  // is anything told to or about the members of a conversation the user was removed from.
  if (membership->kind == ConversationKind::kChannel || removed) {
    result->recipients.push_back(request.sender);
    return Status::Ok();
  }
  Result<LowestMove> lowest =
      target.MoveLowest(id, request.sender, CountedFromJoin(before_mark, membership->joined_seq),
                        CountedFromJoin(result->sender_receipt, membership->joined_seq));
  if (!lowest.ok()) return lowest.status();
  result->delivered_all_seq = lowest->after.delivered_seq;
  result->read_all_seq = lowest->after.read_seq;
  result->all_seq_moved = lowest->news;
  // What the members are told from now on, as a description after the commit reports it: each
  // mark the highest told (a fall is no news), described before this move.
  result->conversation.delivered_all_seq =
      std::max(result->conversation.delivered_all_seq, lowest->after.delivered_seq);
  result->conversation.read_all_seq =
      std::max(result->conversation.read_all_seq, lowest->after.read_seq);
  // News of the lowest marks goes to every member, also with a receipt that moved nothing of
  // the user's own (the news may come from a member's removal); every move of the user's goes
  // to the members of a direct conversation or a small group.
  bool tell_members = lowest->news;
  if (!tell_members && result->receipt_changed) {
    tell_members = membership->kind == ConversationKind::kDirect ||
                   request.receipt_update_max_members == 0 ||
                   result->conversation.member_count <= request.receipt_update_max_members;
  }
  if (!tell_members) return Status::Ok();
  Result<std::vector<UserId>> members = target.Members(id);
  if (!members.ok()) return members.status();
  result->recipients = std::move(*members);
  return Status::Ok();
}

// Presence: last seen of several users at one time. Commits no message.
Status PutLastSeen(AppendTarget& target, const AppendRequest& request, AppendResult* result) {
  for (const UserId& user : request.users) {
    if (user.empty() || user.size() > kMaxUserIdBytes) {
      result->status = InvalidArgument("user ids must be 1..128 bytes");
      return Status::Ok();
    }
  }
  const std::vector<int64_t>& times = request.user_times_ms;
  if (!times.empty() && times.size() != request.users.size()) {
    result->status = InvalidArgument("user_times_ms must give one time per user");
    return Status::Ok();
  }
  for (size_t i = 0; i < request.users.size(); ++i) {
    const int64_t at = times.empty() ? request.server_time_ms : times[i];
    if (Status s = target.PutLastSeen(request.users[i], at); !s.ok()) return s;
  }
  return Status::Ok();
}

// Push tokens are opaque to the server; the bounds keep one user's rows small.
constexpr size_t kMaxPushTokenBytes = 4096;
constexpr size_t kMaxPushPlatformBytes = 64;

// Registers or removes the sender device's push token. Commits no message.
Status ApplyPushToken(AppendTarget& target, const AppendRequest& request, AppendResult* result) {
  if (request.sender_device.empty()) {
    result->status = InvalidArgument("a push token belongs to a device: sender_device is required");
    return Status::Ok();
  }
  if (request.push_token.empty())
    return target.DeletePushToken(request.sender, request.sender_device);
  if (request.push_token.size() > kMaxPushTokenBytes || request.push_platform.empty() ||
      request.push_platform.size() > kMaxPushPlatformBytes) {
    result->status = InvalidArgument(
        "push token needs a platform, at most 64 bytes, and a token of at most 4096 bytes");
    return Status::Ok();
  }
  return target.PutPushToken(request.sender, request.sender_device, request.push_platform,
                             request.push_token, request.server_time_ms, request.max_push_tokens);
}

// A conversation's own retention, changed by an admin (groups, channels) or either member
// (direct), recorded as a system message so every member learns it through Deliver and Sync.
Status ApplySetRetention(AppendTarget& target, const AppendRequest& request, AppendResult* result) {
  const ConversationId id = request.conversation_id;
  Result<Membership> actor = target.Reader().GetMembership(id, request.sender);
  if (!actor.ok()) return actor.status();
  const Access access = actor->kind == ConversationKind::kDirect ? Access::kMember : Access::kAdmin;
  if (Status s = Authorize(id, *actor, access); !s.ok()) {
    result->status = s;
    return Status::Ok();
  }
  if (Status s = CheckRetention(request.retention_ms); !s.ok()) {
    result->status = s;
    return Status::Ok();
  }
  if (Status s = target.SetConversationRetention(id, request.retention_ms); !s.ok()) return s;
  SystemEvent event;
  event.type = SystemEvent::Type::kRetentionChanged;
  event.actor = request.sender;
  event.retention_ms = request.retention_ms;
  Result<Message> message = InsertSystem(target, request, id, std::move(event), request.message_id);
  if (!message.ok()) return message.status();
  result->message = std::move(*message);
  if (Status s = SetRecipients(target, actor->kind, result->message, result); !s.ok()) return s;
  Result<ConversationInfo> info =
      target.Reader().Describe(id, request.sender, request.sender_device);
  if (!info.ok()) return info.status();
  result->conversation = std::move(*info);
  return Status::Ok();
}

}  // namespace

Result<std::optional<DeviceMarks>> ReadSource::ReceiptStart(ConversationId conversation_id,
                                                            const UserId& user,
                                                            const DeviceId& device) {
  std::vector<MemberReceipt> marks;
  if (Status s = Watermarks(conversation_id, user, &marks); !s.ok()) return s;
  if (marks.empty()) return std::optional<DeviceMarks>();
  Result<ConversationInfo> info = Describe(conversation_id, user, device, /*count_unread=*/false);
  if (!info.ok()) return info.status();
  return std::optional<DeviceMarks>(DeviceMarks{std::move(marks[0]), info->delivered_seq});
}

Result<uint64_t> ReadSource::CountUnread(const UserId& user) {
  return UnreadTotal(*this, user, DeviceId());
}

Result<uint64_t> UnreadTotal(ReadSource& source, const UserId& user, const DeviceId& device,
                             const ConversationInfo* known) {
  std::vector<ConversationHead> heads;
  if (Status s = source.UserConversations(user, &heads); !s.ok()) return s;
  return UnreadTotal(source, user, device, heads, known);
}

Result<uint64_t> UnreadTotal(ReadSource& source, const UserId& user, const DeviceId& device,
                             std::span<const ConversationHead> heads,
                             const ConversationInfo* known) {
  uint64_t total = 0;
  for (const ConversationHead& head : heads) {
    if (known != nullptr && head.conversation_id == known->conversation_id) {
      total += known->unread;
      continue;
    }
    Result<ConversationInfo> info = source.Describe(head.conversation_id, user, device);
    if (!info.ok()) return info.status();
    total += info->unread;
  }
  return total;
}

bool RaiseTold(LowestMarks& told, const LowestMarks& now) {
  const LowestMarks was = told;
  told.delivered_seq = std::max(told.delivered_seq, now.delivered_seq);
  told.read_seq = std::max(told.read_seq, now.read_seq);
  return told != was;
}

MemberReceipt CountedFromJoin(MemberReceipt marks, Seq joined_seq) {
  const Seq before_join = joined_seq == 0 ? 0 : joined_seq - 1;
  marks.delivered_seq = std::max(marks.delivered_seq, before_join);
  marks.read_seq = std::max(marks.read_seq, before_join);
  return marks;
}

LowestCount CountLowest(std::span<const MemberReceipt> members, const UserId& mover,
                        const MemberReceipt& mover_marks) {
  LowestCount lowest;
  lowest.marks = {std::numeric_limits<Seq>::max(), std::numeric_limits<Seq>::max()};
  for (const MemberReceipt& member : members) {
    const MemberReceipt& marks = member.user == mover ? mover_marks : member;
    if (marks.delivered_seq < lowest.marks.delivered_seq) {
      lowest.marks.delivered_seq = marks.delivered_seq;
      lowest.at_delivered = 0;
    }
    if (marks.delivered_seq == lowest.marks.delivered_seq) ++lowest.at_delivered;
    if (marks.read_seq < lowest.marks.read_seq) {
      lowest.marks.read_seq = marks.read_seq;
      lowest.at_read = 0;
    }
    if (marks.read_seq == lowest.marks.read_seq) ++lowest.at_read;
  }
  return lowest;
}

Status AppendOne(AppendTarget& target, const AppendRequest& request, AppendResult* result) {
  *result = AppendResult{};
  if (request.op == ConversationOp::kLastSeen) return PutLastSeen(target, request, result);
  if (request.sender.empty()) {
    result->status = InvalidArgument("sender is required");
    return Status::Ok();
  }
  switch (request.op) {
    case ConversationOp::kNone:
      return AppendUserMessage(target, request, result);
    case ConversationOp::kCreateGroup:
      return CreateGroup(target, request, result);
    case ConversationOp::kReceipt:
      return ApplyReceipt(target, request, result);
    case ConversationOp::kSetRetention:
      return ApplySetRetention(target, request, result);
    case ConversationOp::kPushToken:
      return ApplyPushToken(target, request, result);
    default:
      return ChangeGroup(target, request, result);
  }
}

namespace {

// What a message costs in memory, roughly: its strings and attachments beside the struct (the
// merged reads' memo, and the byte bound of a reply, which it overestimates for the wire).
size_t MessageBytes(const Message& m) {
  size_t n = sizeof(Message) + m.sender.size() + m.sender_device.size() + m.client_msg_id.size() +
             m.content_type.size() + m.body.size();
  for (const Attachment& a : m.attachments) {
    n += sizeof(Attachment) + a.url.size() + a.mime_type.size() + a.sha256.size() + a.name.size();
  }
  n += m.system.actor.size() + m.system.title.size();
  for (const UserId& user : m.system.users) n += sizeof(UserId) + user.size();
  return n;
}

// What a conversation listed in a Sync reply adds beside its messages: its state and a gap,
// counted like MessageBytes (conversations emptied by retention bring nothing else).
size_t StateBytes(const ConversationInfo& info) {
  return sizeof(ConversationInfo) + sizeof(Gap) + info.title.size() + info.peer.size();
}

// The first read of a range under a byte bound; later ones are four times the last.
constexpr size_t kFirstReadChunk = 16;

// Keeps the messages of `messages` from `from` on while `*bytes` stays within `max_bytes` (0 =
// no bound), always the first message of a reply that holds nothing else yet (so every reply
// makes progress); drops the rest. True if it dropped any.
bool KeepWithin(std::vector<Message>* messages, size_t from, uint64_t max_bytes, uint64_t* bytes) {
  if (max_bytes == 0) return false;
  size_t keep = from;
  for (; keep < messages->size(); ++keep) {
    const uint64_t n = MessageBytes((*messages)[keep]);
    if ((keep > 0 || *bytes > 0) && *bytes + n > max_bytes) break;
    *bytes += n;
  }
  if (keep == messages->size()) return false;
  messages->erase(messages->begin() + static_cast<std::ptrdiff_t>(keep), messages->end());
  return true;
}

// Appends a range's messages to `out` through `read(want)`, which appends up to `want` more of
// them (after those it appended before) and returns how many the source gave. Without a byte
// bound that is one read of `room`; with one the range is read in growing chunks, so a page of
// large messages reads about what it carries rather than `room` messages it would drop. Stops
// at `room` messages, at the range's end, or at `max_bytes` (then true: the page was cut).
template <typename Read>
Result<bool> ReadInChunks(const Read& read, size_t room, uint64_t max_bytes, uint64_t* bytes,
                          std::vector<Message>* out) {
  const size_t before = out->size();
  size_t want = max_bytes == 0 ? room : std::min(room, kFirstReadChunk);
  while (true) {
    const size_t chunk_start = out->size();
    Result<size_t> got = read(want);
    if (!got.ok()) return got.status();
    if (KeepWithin(out, chunk_start, max_bytes, bytes)) return true;
    const size_t taken = out->size() - before;
    if (*got < want || taken >= room || out->size() == chunk_start) return false;
    want = std::min(room - taken, want * 4);
  }
}

}  // namespace

// Conversations are visited in id order and each contributes its missing messages in seq
// order until `limit` is reached. A conversation is listed in `conversations` when the reply
// carries at least one of its messages or a gap for it (its ConversationInfo then describes
// exactly what the client is about to apply), and, with nothing new, when the client holds
// messages retention deleted or knows lower lowest watermarks than the members were told.
// Conversations after the cut are not listed; has_more tells the client to sync again with
// advanced cursors, and they come then.
Result<SyncReply> RunSync(ReadSource& source, const SyncQuery& query) {
  if (query.limit == 0) return InvalidArgument("limit must be at least 1");
  if (query.catchup_max == 0) return InvalidArgument("catchup_max must be at least 1");

  // A client may repeat a conversation; its highest claims win, and its lowest held seq.
  struct Claim {
    Seq seq = 0;
    Seq lowest_seq = 0;  // 0: not told
    std::optional<Seq> delivered_all_seq;
    std::optional<Seq> read_all_seq;
  };
  auto highest = [](std::optional<Seq>& kept, const std::optional<Seq>& named) {
    if (named) kept = std::max(kept.value_or(0), *named);
  };
  std::map<ConversationId, Claim> cursors;
  for (const Cursor& cursor : query.cursors) {
    Claim& claim = cursors[cursor.conversation_id];
    claim.seq = std::max(claim.seq, cursor.seq);
    if (cursor.lowest_seq != 0 && (claim.lowest_seq == 0 || cursor.lowest_seq < claim.lowest_seq)) {
      claim.lowest_seq = cursor.lowest_seq;
    }
    highest(claim.delivered_all_seq, cursor.delivered_all_seq);
    highest(claim.read_all_seq, cursor.read_all_seq);
  }

  std::vector<ConversationHead> heads;
  if (Status s = source.UserConversations(query.user, &heads); !s.ok()) return s;

  SyncReply reply;
  uint64_t bytes = 0;  // of reply.messages, as MessageBytes counts them
  // Unread counts cover every conversation, also those this page does not list, so every
  // device shows the same total. The descriptions are kept for the conversations listed below.
  std::vector<ConversationInfo> infos;
  infos.reserve(heads.size());
  for (const ConversationHead& head : heads) {
    Result<ConversationInfo> info = source.Describe(head.conversation_id, query.user, query.device);
    if (!info.ok()) return info.status();
    reply.unread_total += info->unread;
    infos.push_back(std::move(*info));
  }
  for (size_t i = 0; i < heads.size(); ++i) {
    ConversationHead head = heads[i];
    // A removed member's log ends at its removal.
    if (head.removed_at_seq != 0) head.last_seq = std::min(head.last_seq, head.removed_at_seq);
    auto it = cursors.find(head.conversation_id);
    const Seq cursor = it == cursors.end() ? 0 : it->second.seq;
    // Retention may have removed the oldest messages; everything stored was removed when
    // first_seq is 0 while last_seq is not.
    const Seq first_stored = head.first_seq == 0 ? head.last_seq + 1 : head.first_seq;
    // The client still holds messages that retention deleted since it last heard (it was
    // offline, or not subscribed to the channel, when it happened): the state alone, with the
    // new first_seq, tells it to drop them.
    const Seq lowest_held = it == cursors.end() ? 0 : it->second.lowest_seq;
    const bool expired_held = lowest_held != 0 && first_stored > lowest_held;
    // The lowest watermarks rose above what the client knows (the ReceiptUpdates saying so went
    // out while it was away): the state alone tells it. Only against marks the cursor names: a
    // client that names none predates them and would be sent the same states on every Sync.
    auto below = [](const std::optional<Seq>& known, Seq stored) {
      return known.has_value() && stored > *known;
    };
    const bool marks_behind =
        it != cursors.end() && (below(it->second.delivered_all_seq, infos[i].delivered_all_seq) ||
                                below(it->second.read_all_seq, infos[i].read_all_seq));
    const bool state_due = expired_held || marks_behind;
    if (head.last_seq <= cursor && !state_due) continue;
    if (reply.messages.size() >= query.limit ||
        (query.max_bytes != 0 && bytes >= query.max_bytes && !reply.conversations.empty())) {
      reply.has_more = true;
      break;
    }
    if (head.last_seq <= cursor) {
      bytes += StateBytes(infos[i]);
      reply.conversations.push_back(std::move(infos[i]));
      continue;
    }

    // A member sees the log from the change that added it. The part before it is reported as
    // a gap like any other (History answers it with nothing), so a client's cursor can pass it:
    // one that waited for seq cursor + 1 would otherwise never apply what follows.
    const Seq lowest = std::max(cursor + 1, head.joined_seq);
    Seq start = lowest;
    if (head.last_seq - cursor > query.catchup_max) {
      start = std::max(start, head.last_seq - query.catchup_max + 1);
    }
    // Past what retention removed (for a removed member the gap ends at its removal, whatever
    // retention removed after it).
    start = std::min(std::max(start, first_stored), head.last_seq + 1);
    const bool gap = start > cursor + 1;
    if (gap) reply.gaps.push_back({head.conversation_id, cursor + 1, start - 1});

    const size_t room = query.limit - reply.messages.size();
    const size_t before = reply.messages.size();
    Seq from = start;
    auto read = [&](size_t want) -> Result<size_t> {
      if (from > head.last_seq) return size_t{0};
      const size_t at = reply.messages.size();
      if (Status s = source.ReadAscending(head.conversation_id, from, head.last_seq, want,
                                          &reply.messages);
          !s.ok()) {
        return s;
      }
      if (reply.messages.size() > at) from = reply.messages.back().seq + 1;
      return reply.messages.size() - at;
    };
    Result<bool> cut = ReadInChunks(read, room, query.max_bytes, &bytes, &reply.messages);
    if (!cut.ok()) return cut.status();
    const size_t added = reply.messages.size() - before;
    if (added > 0 || gap || state_due) {
      bytes += StateBytes(infos[i]);
      reply.conversations.push_back(std::move(infos[i]));
    }
    if (*cut || (added == room && reply.messages.back().seq < head.last_seq)) {
      reply.has_more = true;
      break;
    }
  }
  return reply;
}

namespace {

// A ReadSource for several Syncs in one snapshot: ReadAscending keeps what it read per
// (conversation, to_seq) and answers a later call for the same range, or a part of it starting
// later, from that copy when the copy holds every message the call asks for. Everything else
// goes to the inner source.
class MergingSource final : public ReadSource {
 public:
  explicit MergingSource(ReadSource& inner) : inner_(inner) {}

  Status UserConversations(const UserId& user, std::vector<ConversationHead>* out) override {
    return inner_.UserConversations(user, out);
  }
  Result<Membership> GetMembership(ConversationId conversation_id, const UserId& user) override {
    return inner_.GetMembership(conversation_id, user);
  }
  Result<ConversationHead> Head(ConversationId conversation_id) override {
    return inner_.Head(conversation_id);
  }
  Result<ConversationInfo> Describe(ConversationId conversation_id, const UserId& user,
                                    const DeviceId& device, bool count_unread) override {
    return inner_.Describe(conversation_id, user, device, count_unread);
  }
  Status ReadDescending(ConversationId conversation_id, Seq before_seq, size_t max,
                        std::vector<Message>* out) override {
    return inner_.ReadDescending(conversation_id, before_seq, max, out);
  }
  Status Watermarks(ConversationId conversation_id, const UserId& only,
                    std::vector<MemberReceipt>* out) override {
    return inner_.Watermarks(conversation_id, only, out);
  }
  Result<bool> SharesConversation(const UserId& a, const UserId& b) override {
    return inner_.SharesConversation(a, b);
  }
  Result<int64_t> LastSeen(const UserId& user) override { return inner_.LastSeen(user); }
  Status PushTokens(const UserId& user, std::vector<PushToken>* out) override {
    return inner_.PushTokens(user, out);
  }

  Status ReadAscending(ConversationId conversation_id, Seq from_seq, Seq to_seq, size_t max,
                       std::vector<Message>* out) override {
    const Key key{conversation_id, to_seq};
    auto it = ranges_.find(key);
    if (it != ranges_.end() && it->second.from_seq <= from_seq) {
      const Range& range = it->second;
      // The copy holds every message of [range.from_seq, last copied seq]; it answers the call
      // if it reaches to_seq (the read was not cut by its max) or holds `max` messages from
      // from_seq on.
      auto first = std::lower_bound(range.messages.begin(), range.messages.end(), from_seq,
                                    [](const Message& m, Seq seq) { return m.seq < seq; });
      const auto available = static_cast<size_t>(range.messages.end() - first);
      if (range.complete || available >= max) {
        ++merged_;
        out->insert(out->end(), first,
                    first + static_cast<std::ptrdiff_t>(std::min(available, max)));
        return Status::Ok();
      }
    }
    const size_t before = out->size();
    if (Status s = inner_.ReadAscending(conversation_id, from_seq, to_seq, max, out); !s.ok()) {
      return s;
    }
    const auto read = out->begin() + static_cast<std::ptrdiff_t>(before);
    size_t bytes = 0;
    for (auto m = read; m != out->end(); ++m) bytes += MessageBytes(*m);
    const size_t n = out->size() - before;
    if (it != ranges_.end()) {
      Range& range = it->second;
      const Seq next = range.messages.empty() ? range.from_seq : range.messages.back().seq + 1;
      if (!range.complete && from_seq == next) {
        // The next part of the copied range (RunSync reads in chunks): the copy grows.
        if (bytes_ + bytes <= kMergedReadBytesMax) {
          bytes_ += bytes;
          range.bytes += bytes;
          range.messages.insert(range.messages.end(), read, out->end());
          range.complete = n < max;
        }
        return Status::Ok();
      }
      // A call reaching further back, or asking for more, replaces the older copy.
      bytes_ -= range.bytes;
      ranges_.erase(it);
    }
    if (bytes_ + bytes > kMergedReadBytesMax) return Status::Ok();
    bytes_ += bytes;
    ranges_.emplace(key, Range{from_seq, n < max, bytes, std::vector<Message>(read, out->end())});
    return Status::Ok();
  }

  // Calls answered from a copy.
  size_t merged() const { return merged_; }

 private:
  using Key = std::pair<ConversationId, Seq>;
  struct Range {
    Seq from_seq = 0;
    bool complete = false;  // every message up to to_seq is here
    size_t bytes = 0;
    std::vector<Message> messages;
  };

  ReadSource& inner_;
  std::map<Key, Range> ranges_;
  size_t bytes_ = 0;
  size_t merged_ = 0;
};

}  // namespace

size_t RunSyncMany(ReadSource& source, std::span<const SyncQuery> queries,
                   const MessageStore::SyncDone& done, const std::function<bool()>& snapshot_lost) {
  if (queries.size() == 1) {
    done(0, RunSync(source, queries[0]));
    return 0;
  }
  MergingSource merging(source);
  for (size_t i = 0; i < queries.size(); ++i) {
    Result<SyncReply> reply = RunSync(merging, queries[i]);
    // A failure is the query's own (a refusal, a row that does not decode) unless it ended the
    // snapshot the batch is read from.
    if (!reply.ok() && snapshot_lost && snapshot_lost()) {
      const Status failure = reply.status();
      done(i, std::move(reply));
      for (size_t rest = i + 1; rest < queries.size(); ++rest) done(rest, failure);
      break;
    }
    done(i, std::move(reply));
  }
  return merging.merged();
}

Result<HistoryReply> RunHistory(ReadSource& source, const HistoryQuery& query) {
  if (query.limit == 0) return InvalidArgument("limit must be at least 1");
  Result<Membership> membership = source.GetMembership(query.conversation_id, query.user);
  if (!membership.ok()) return membership.status();
  if (Status s = Authorize(query.conversation_id, *membership, Access::kRead); !s.ok()) return s;
  Result<ConversationHead> head = source.Head(query.conversation_id);
  if (!head.ok()) return head.status();

  Seq last = head->last_seq;
  if (membership->removed_at_seq != 0) last = std::min(last, membership->removed_at_seq);
  const Seq visible_from = std::max<Seq>(membership->joined_seq, 1);
  const Seq before = query.before_seq == 0 || query.before_seq > last ? last + 1 : query.before_seq;
  HistoryReply reply;
  // 0 also when nothing up to a removed member's removal is stored any more.
  reply.first_seq =
      head->first_seq == 0 || head->first_seq > last ? 0 : std::max(head->first_seq, visible_from);
  if (before <= visible_from) return reply;
  Seq below = before;
  auto read = [&](size_t want) -> Result<size_t> {
    if (below <= visible_from) return size_t{0};
    const size_t at = reply.messages.size();
    if (Status s = source.ReadDescending(query.conversation_id, below, want, &reply.messages);
        !s.ok()) {
      return s;
    }
    const size_t got = reply.messages.size() - at;
    std::erase_if(reply.messages, [&](const Message& m) { return m.seq < visible_from; });
    if (reply.messages.size() > at) below = reply.messages.back().seq;
    return got;
  };
  uint64_t bytes = 0;
  if (Result<bool> cut = ReadInChunks(read, query.limit, query.max_bytes, &bytes, &reply.messages);
      !cut.ok()) {
    return cut.status();
  }
  reply.has_more = !reply.messages.empty() && reply.messages.back().seq > reply.first_seq;
  return reply;
}

Status ValidateSweep(const SweepRequest& request) {
  if (request.max_messages == 0) return InvalidArgument("max_messages must be at least 1");
  if (request.default_retention_ms < 0) {
    return InvalidArgument("default_retention_ms must not be negative");
  }
  if (request.resend_window_ms < 0) return InvalidArgument("resend_window_ms must not be negative");
  return Status::Ok();
}

Message DeletedMessage(ConversationId conversation_id, Seq seq, MessageId message_id,
                       const UserId& sender, const std::string& client_msg_id,
                       int64_t server_time_ms) {
  Message m;
  m.conversation_id = conversation_id;
  m.seq = seq;
  m.message_id = message_id;
  m.sender = sender;
  m.client_msg_id = client_msg_id;
  m.server_time_ms = server_time_ms;
  m.kind = MessageKind::kUser;
  return m;
}

Status CheckRetention(int64_t retention_ms) {
  if (retention_ms < kKeepForever) {
    return InvalidArgument("retention_ms must be -1 (keep), 0 (server default) or positive");
  }
  return Status::Ok();
}

Result<std::vector<PushTarget>> RunPushTargets(ReadSource& source, std::span<const UserId> users) {
  std::vector<UserId> sorted(users.begin(), users.end());
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  std::vector<PushTarget> out;
  out.reserve(sorted.size());
  for (UserId& user : sorted) {
    PushTarget target;
    if (Status s = source.PushTokens(user, &target.tokens); !s.ok()) return s;
    // The badge counts what Sync would report.
    Result<uint64_t> total = source.CountUnread(user);
    if (!total.ok()) return total.status();
    target.unread_total = *total;
    target.user = std::move(user);
    out.push_back(std::move(target));
  }
  return out;
}

Result<ReceiptsReply> RunReceipts(ReadSource& source, const ReceiptsQuery& query) {
  Result<Membership> membership = source.GetMembership(query.conversation_id, query.user);
  if (!membership.ok()) return membership.status();
  if (Status s = Authorize(query.conversation_id, *membership, Access::kMember); !s.ok()) {
    return s;
  }
  ReceiptsReply reply;
  reply.kind = membership->kind;
  reply.role = membership->role;
  const bool channel = membership->kind == ConversationKind::kChannel;
  if (Status s =
          source.Watermarks(query.conversation_id, channel ? query.user : UserId(), &reply.members);
      !s.ok()) {
    return s;
  }
  return reply;
}

Result<PresenceReply> RunPresence(ReadSource& source, const PresenceQuery& query) {
  PresenceReply reply;
  reply.targets.reserve(query.targets.size());
  for (const UserId& target : query.targets) {
    PresenceContact contact;
    contact.user = target;
    Result<bool> shares = source.SharesConversation(query.user, target);
    if (!shares.ok()) return shares.status();
    contact.shares_conversation = *shares;
    Result<int64_t> last_seen = source.LastSeen(target);
    if (!last_seen.ok()) return last_seen.status();
    contact.last_seen_ms = *last_seen;
    reply.targets.push_back(std::move(contact));
  }
  return reply;
}

}  // namespace chat::server
