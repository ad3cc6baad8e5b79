#include "src/core/codec.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/stubs/logging.h>
#include <google/protobuf/util/json_util.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "chat/log.h"
#include "src/core/utf8.h"

namespace chat::codec {

namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;

// protobuf's own recursion limit for parsing; the diagnosis below uses the same bound so that it
// blames the same inputs the parser refused.
constexpr int kMaxDepth = 100;

// Envelope.batch is field 53 and Batch.envelopes is field 1, both length-delimited (wire type 2).
// PackBatch writes these tags by hand, so they are spelled out here once.
constexpr uint32_t kEnvelopeBatchTag = (53u << 3) | 2u;
constexpr uint32_t kBatchEnvelopesTag = (1u << 3) | 2u;

// protobuf logs parse failures (e.g. invalid UTF-8) to stderr by default. Bad input from the
// network is expected and answered with a Status, so those lines would only be noise (and a way
// for a peer to flood the log); they are forwarded to the SDK's log at debug level instead.
void ProtobufLogHandler(google::protobuf::LogLevel level, const char* filename, int line,
                        const std::string& message) {
  const LogLevel ours =
      level >= google::protobuf::LOGLEVEL_FATAL ? LogLevel::kError : LogLevel::kDebug;
  Log(ours, std::string("protobuf ") + (filename ? filename : "?") + ":" + std::to_string(line) +
                ": " + message);
}

void InstallProtobufLogHandler() {
  // SetLogHandler is not thread-safe; a function-local static runs it exactly once.
  static const bool installed = [] {
    google::protobuf::SetLogHandler(&ProtobufLogHandler);
    return true;
  }();
  (void)installed;
}

std::string JoinPath(const std::string& path, const std::string& name) {
  return path.empty() ? name : path + "." + name;
}

// Why a binary envelope failed to parse. protobuf's parser only answers true/false, but a client
// deserves to know whether its frame was cut short, structurally wrong or carried a bad string.
class WireDiagnosis {
 public:
  enum class Problem { kNone, kTruncated, kMalformed, kInvalidUtf8 };

  WireDiagnosis(const uint8_t* begin, const uint8_t* end) : p_(begin), end_(end) {}

  Problem Run(const Descriptor* descriptor) {
    return WalkMessage(end_, descriptor, 0, std::string(), 0);
  }
  // For kInvalidUtf8: the field's path from the envelope, e.g. "send.client_msg_id".
  const std::string& field() const { return field_; }

 private:
  Problem ReadVarint(const uint8_t* limit, uint64_t* value) {
    uint64_t result = 0;
    for (int i = 0; i < 10; ++i) {
      if (p_ == limit) return Problem::kTruncated;
      const uint8_t byte = *p_++;
      result |= static_cast<uint64_t>(byte & 0x7f) << (7 * i);
      if ((byte & 0x80) == 0) {
        *value = result;
        return Problem::kNone;
      }
    }
    return Problem::kMalformed;  // more than 10 bytes cannot be a 64-bit varint
  }

  // Walks fields until `limit`, or until the end-group tag of `group_field` when that is non-zero.
  // `descriptor` is null inside unknown groups, whose contents are only checked structurally.
  Problem WalkMessage(const uint8_t* limit, const Descriptor* descriptor, int depth,
                      const std::string& path, uint32_t group_field) {
    while (p_ < limit) {
      uint64_t tag = 0;
      if (Problem problem = ReadVarint(limit, &tag); problem != Problem::kNone) return problem;
      if (tag > UINT32_MAX) return Problem::kMalformed;
      const uint32_t number = static_cast<uint32_t>(tag >> 3);
      const uint32_t wire_type = static_cast<uint32_t>(tag & 7);
      if (number == 0) return Problem::kMalformed;
      switch (wire_type) {
        case 0: {  // varint
          uint64_t ignored = 0;
          if (Problem problem = ReadVarint(limit, &ignored); problem != Problem::kNone) {
            return problem;
          }
          break;
        }
        case 1:  // fixed64
          if (limit - p_ < 8) return Problem::kTruncated;
          p_ += 8;
          break;
        case 5:  // fixed32
          if (limit - p_ < 4) return Problem::kTruncated;
          p_ += 4;
          break;
        case 2: {  // length-delimited
          uint64_t length = 0;
          if (Problem problem = ReadVarint(limit, &length); problem != Problem::kNone) {
            return problem;
          }
          if (length > static_cast<uint64_t>(limit - p_)) return Problem::kTruncated;
          const uint8_t* field_end = p_ + length;
          const FieldDescriptor* field =
              descriptor ? descriptor->FindFieldByNumber(static_cast<int>(number)) : nullptr;
          if (field != nullptr && field->type() == FieldDescriptor::TYPE_MESSAGE) {
            if (depth + 1 >= kMaxDepth) return Problem::kMalformed;
            Problem problem = WalkMessage(field_end, field->message_type(), depth + 1,
                                          JoinPath(path, field->name()), 0);
            if (problem != Problem::kNone) return problem;
          } else if (field != nullptr && field->type() == FieldDescriptor::TYPE_STRING) {
            if (!IsValidUtf8(std::string_view(reinterpret_cast<const char*>(p_), length))) {
              field_ = JoinPath(path, field->name());
              return Problem::kInvalidUtf8;
            }
          }
          p_ = field_end;
          break;
        }
        case 3: {  // start group: only unknown fields can be groups in a proto3 schema
          if (depth + 1 >= kMaxDepth) return Problem::kMalformed;
          Problem problem = WalkMessage(limit, nullptr, depth + 1, path, number);
          if (problem != Problem::kNone) return problem;
          break;
        }
        case 4:  // end group
          return number == group_field ? Problem::kNone : Problem::kMalformed;
        default:  // wire types 6 and 7 do not exist
          return Problem::kMalformed;
      }
    }
    // Running out of bytes inside a group means the frame was cut short.
    return group_field != 0 ? Problem::kTruncated : Problem::kNone;
  }

  const uint8_t* p_;
  const uint8_t* const end_;
  std::string field_;
};

Status DiagnoseBinary(std::string_view bytes) {
  const auto* begin = reinterpret_cast<const uint8_t*>(bytes.data());
  WireDiagnosis diagnosis(begin, begin + bytes.size());
  switch (diagnosis.Run(v1::Envelope::descriptor())) {
    case WireDiagnosis::Problem::kTruncated:
      return InvalidArgument("truncated");
    case WireDiagnosis::Problem::kInvalidUtf8:
      return InvalidArgument("invalid UTF-8 in field " + diagnosis.field());
    case WireDiagnosis::Problem::kMalformed:
    case WireDiagnosis::Problem::kNone:
      break;
  }
  return InvalidArgument("malformed");
}

// The checks that apply to a parsed envelope in either encoding.
Status CheckBody(const v1::Envelope& envelope) {
  if (envelope.body_case() == v1::Envelope::BODY_NOT_SET) {
    return InvalidArgument("unknown message type");
  }
  if (envelope.body_case() != v1::Envelope::kBatch) return Status::Ok();
  for (const v1::Envelope& element : envelope.batch().envelopes()) {
    if (element.body_case() == v1::Envelope::kBatch) return InvalidArgument("nested batch");
    if (element.body_case() == v1::Envelope::BODY_NOT_SET) {
      return InvalidArgument("unknown message type");
    }
  }
  return Status::Ok();
}

Status DecodeBinary(std::string_view bytes, v1::Envelope* out) {
  if (out->ParseFromArray(bytes.data(), static_cast<int>(bytes.size()))) return Status::Ok();
  out->Clear();
  return DiagnoseBinary(bytes);
}

// protobuf's JSON errors may span lines (an excerpt of the input and a caret) and start with
// ": " when no field path is known. A Status message is one short line, so only the first line is
// kept, bounded, and kept UTF-8 since it may quote the input.
std::string OneLine(google::protobuf::StringPiece text) {
  constexpr size_t kMaxLength = 200;
  std::string_view line(text.data(), text.size());
  line = line.substr(0, line.find('\n'));
  while (!line.empty() && (line.front() == ':' || line.front() == ' ')) line.remove_prefix(1);
  while (!line.empty() && line.back() == ' ') line.remove_suffix(1);
  return SanitizeUtf8(line.substr(0, kMaxLength));
}

Status DecodeJson(std::string_view bytes, v1::Envelope* out) {
  // The JSON parser's messages about bad strings are generic; checking the text first gives the
  // same precise answer as the binary path.
  if (!IsValidUtf8(bytes)) return InvalidArgument("invalid UTF-8 in JSON text");
  google::protobuf::util::JsonParseOptions options;
  // Unknown fields are dropped, as the binary parser skips them: a newer peer may add fields.
  // An envelope with nothing but unknown fields then has no body and is refused below.
  options.ignore_unknown_fields = true;
  auto status = google::protobuf::util::JsonStringToMessage(
      google::protobuf::StringPiece(bytes.data(), bytes.size()), out, options);
  if (status.ok()) return Status::Ok();
  out->Clear();
  return InvalidArgument("invalid JSON: " + OneLine(status.message()));
}

// Appends `value` as a protobuf varint.
void AppendVarint(uint64_t value, std::string* out) {
  while (value >= 0x80) {
    out->push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out->push_back(static_cast<char>(value));
}

size_t VarintSize(uint64_t value) {
  size_t size = 1;
  while (value >= 0x80) {
    value >>= 7;
    ++size;
  }
  return size;
}

std::string PackBinary(std::span<const Frame> frames) {
  size_t body = 0;
  for (const Frame& frame : frames) {
    if (!frame) continue;
    body += VarintSize(kBatchEnvelopesTag) + VarintSize(frame->size()) + frame->size();
  }
  std::string out;
  out.reserve(VarintSize(kEnvelopeBatchTag) + VarintSize(body) + body);
  AppendVarint(kEnvelopeBatchTag, &out);
  AppendVarint(body, &out);
  for (const Frame& frame : frames) {
    if (!frame) continue;
    AppendVarint(kBatchEnvelopesTag, &out);
    AppendVarint(frame->size(), &out);
    out += *frame;
  }
  return out;
}

std::string PackJson(std::span<const Frame> frames) {
  static constexpr std::string_view kOpen = R"({"batch":{"envelopes":[)";
  static constexpr std::string_view kClose = "]}}";
  size_t size = kOpen.size() + kClose.size();
  for (const Frame& frame : frames) {
    if (frame) size += frame->size() + 1;
  }
  std::string out;
  out.reserve(size);
  out += kOpen;
  bool first = true;
  for (const Frame& frame : frames) {
    if (!frame) continue;
    if (!first) out += ',';
    first = false;
    out += *frame;
  }
  out += kClose;
  return out;
}

Status Missing(std::string_view field) {
  return InvalidArgument("missing required field: " + std::string(field));
}

template <typename T>
Status RequireConversation(const T& body, std::string_view name) {
  if (body.conversation_id() == 0) return Missing(std::string(name) + ".conversation_id");
  return Status::Ok();
}

template <typename T>
Status RequireConversationAndUsers(const T& body, std::string_view name) {
  if (Status status = RequireConversation(body, name); !status.ok()) return status;
  if (body.users().empty()) return Missing(std::string(name) + ".users");
  return Status::Ok();
}

template <typename Out, typename In>
Out EnumOrUnspecified(In value, int max) {
  const int raw = static_cast<int>(value);
  return raw >= 0 && raw <= max ? static_cast<Out>(raw) : static_cast<Out>(0);
}

// `in` is a const SystemEvent& (copied) or a SystemEvent&& (its strings moved).
template <typename Event>
void SystemEventToProto(Event&& in, v1::SystemEvent* out) {
  out->set_type(static_cast<v1::SystemEvent::Type>(in.type));
  out->set_actor(std::forward<Event>(in).actor);
  out->mutable_users()->Reserve(static_cast<int>(in.users.size()));
  for (auto& user : in.users) {
    if constexpr (std::is_rvalue_reference_v<Event&&>) {
      out->add_users(std::move(user));
    } else {
      out->add_users(user);
    }
  }
  out->set_title(std::forward<Event>(in).title);
  out->set_role(static_cast<v1::Role>(in.role));
  out->set_seq(in.seq);
  out->set_retention_ms(in.retention_ms);
}

SystemEvent FromProto(const v1::SystemEvent& in) {
  SystemEvent out;
  out.type = EnumOrUnspecified<SystemEvent::Type>(in.type(), v1::SystemEvent::Type_MAX);
  out.actor = in.actor();
  out.users.assign(in.users().begin(), in.users().end());
  out.title = in.title();
  out.role = EnumOrUnspecified<Role>(in.role(), v1::Role_MAX);
  out.seq = in.seq();
  out.retention_ms = in.retention_ms();
  return out;
}

}  // namespace

Status Decode(std::string_view bytes, Format format, size_t max_bytes, v1::Envelope* out) {
  out->Clear();
  // protobuf takes an int size; anything beyond it is too large whatever the caller's limit.
  const size_t limit = std::min<size_t>(max_bytes, INT_MAX);
  if (bytes.size() > limit) {
    return InvalidArgument("too large (" + std::to_string(bytes.size()) + " > " +
                           std::to_string(limit) + " bytes)");
  }
  InstallProtobufLogHandler();
  Status status = format == Format::kBinary ? DecodeBinary(bytes, out) : DecodeJson(bytes, out);
  if (status.ok()) status = CheckBody(*out);
  if (!status.ok()) out->Clear();
  return status;
}

Status Validate(const v1::Envelope& envelope) {
  switch (envelope.body_case()) {
    case v1::Envelope::kHello:
      if (envelope.hello().token().empty()) return Missing("hello.token");
      if (envelope.hello().device_id().empty()) return Missing("hello.device_id");
      return Status::Ok();
    case v1::Envelope::kSend: {
      const v1::Send& send = envelope.send();
      const bool has_recipient =
          (send.to_case() == v1::Send::kConversationId && send.conversation_id() != 0) ||
          (send.to_case() == v1::Send::kPeer && !send.peer().empty());
      if (!has_recipient) return Missing("send.conversation_id or send.peer");
      if (send.client_msg_id().empty()) return Missing("send.client_msg_id");
      return Status::Ok();
    }
    case v1::Envelope::kReceipt:
      return RequireConversation(envelope.receipt(), "receipt");
    case v1::Envelope::kHistory:
      return RequireConversation(envelope.history(), "history");
    case v1::Envelope::kTyping:
      return RequireConversation(envelope.typing(), "typing");
    case v1::Envelope::kSubscribe:
      return RequireConversation(envelope.subscribe(), "subscribe");
    case v1::Envelope::kUnsubscribe:
      return RequireConversation(envelope.unsubscribe(), "unsubscribe");
    case v1::Envelope::kGetReceipts:
      return RequireConversation(envelope.get_receipts(), "get_receipts");
    case v1::Envelope::kLeave:
      return RequireConversation(envelope.leave(), "leave");
    case v1::Envelope::kSetRetention:
      return RequireConversation(envelope.set_retention(), "set_retention");
    case v1::Envelope::kRenameGroup:
      if (Status status = RequireConversation(envelope.rename_group(), "rename_group");
          !status.ok()) {
        return status;
      }
      if (envelope.rename_group().title().empty()) return Missing("rename_group.title");
      return Status::Ok();
    case v1::Envelope::kAddMembers:
      return RequireConversationAndUsers(envelope.add_members(), "add_members");
    case v1::Envelope::kRemoveMembers:
      return RequireConversationAndUsers(envelope.remove_members(), "remove_members");
    case v1::Envelope::kSetRole: {
      const v1::SetRole& set_role = envelope.set_role();
      if (Status status = RequireConversation(set_role, "set_role"); !status.ok()) return status;
      if (set_role.user().empty()) return Missing("set_role.user");
      if (set_role.role() == v1::ROLE_UNSPECIFIED) return Missing("set_role.role");
      return Status::Ok();
    }
    case v1::Envelope::kCreateGroup: {
      const v1::ConversationKind kind = envelope.create_group().kind();
      if (kind == v1::CONVERSATION_KIND_UNSPECIFIED) return Missing("create_group.kind");
      if (kind != v1::CONVERSATION_KIND_GROUP && kind != v1::CONVERSATION_KIND_CHANNEL) {
        return InvalidArgument("create_group.kind must be GROUP or CHANNEL");
      }
      return Status::Ok();
    }
    case v1::Envelope::kPresenceSubscribe:
      if (envelope.presence_subscribe().users().empty()) {
        return Missing("presence_subscribe.users");
      }
      return Status::Ok();
    case v1::Envelope::kBatch:
      for (const v1::Envelope& element : envelope.batch().envelopes()) {
        if (Status status = Validate(element); !status.ok()) return status;
      }
      return Status::Ok();
    default:
      // Bodies without required fields (Sync, Ping, ...) and server->client bodies, whose
      // content is the server's own responsibility.
      return Status::Ok();
  }
}

std::string Encode(const v1::Envelope& envelope, Format format) {
  InstallProtobufLogHandler();
  if (format == Format::kBinary) return envelope.SerializeAsString();
  // Output uses protobuf's canonical JSON mapping: lowerCamelCase field names, 64-bit integers as
  // strings, enums by name, default values omitted (docs/protocol.md). Decode accepts both
  // lowerCamelCase and the proto's snake_case names.
  std::string out;
  auto status = google::protobuf::util::MessageToJsonString(envelope, &out);
  if (status.ok()) return out;
  // protobuf's printer drops ill-formed UTF-8 rather than failing, so this is not expected to
  // happen; if it does, the peer still gets a well-formed reply it can match to its request
  // instead of an empty or broken frame.
  const auto message = status.message();
  Log(LogLevel::kError,
      "codec: JSON encoding failed: " + std::string(message.data(), message.size()));
  v1::Envelope error = ErrorEnvelope(envelope.rid(), Internal("response could not be encoded"));
  out.clear();
  if (!google::protobuf::util::MessageToJsonString(error, &out).ok()) out.clear();
  return out;
}

Frame EncodeShared(const v1::Envelope& envelope, Format format) {
  return std::make_shared<const std::string>(Encode(envelope, format));
}

std::string PackBatch(std::span<const Frame> frames, Format format) {
  size_t present = 0;
  const Frame* only = nullptr;
  for (const Frame& frame : frames) {
    if (!frame) continue;
    ++present;
    only = &frame;
  }
  if (present == 1) return **only;
  return format == Format::kBinary ? PackBinary(frames) : PackJson(frames);
}

void ToProto(const Attachment& in, v1::Attachment* out) {
  out->set_url(in.url);
  out->set_mime_type(in.mime_type);
  out->set_size(in.size);
  out->set_sha256(in.sha256);
  out->set_name(in.name);
  out->set_width(in.width);
  out->set_height(in.height);
  out->set_duration_ms(in.duration_ms);
}

Attachment FromProto(const v1::Attachment& in) {
  Attachment out;
  out.url = in.url();
  out.mime_type = in.mime_type();
  out.size = in.size();
  out.sha256 = in.sha256();
  out.name = in.name();
  out.width = in.width();
  out.height = in.height();
  out.duration_ms = in.duration_ms();
  return out;
}

namespace {

// `in` is a const Message& (copied) or a Message&& (its strings moved; each member is moved at
// most once).
template <typename M>
void MessageToProto(M&& in, v1::Message* out) {
  out->set_conversation_id(in.conversation_id);
  out->set_seq(in.seq);
  out->set_message_id(in.message_id);
  out->set_sender(std::forward<M>(in).sender);
  out->set_sender_device(std::forward<M>(in).sender_device);
  out->set_client_msg_id(std::forward<M>(in).client_msg_id);
  out->set_server_time_ms(in.server_time_ms);
  out->set_kind(static_cast<v1::MessageKind>(in.kind));
  out->set_content_type(std::forward<M>(in).content_type);
  out->set_body(std::forward<M>(in).body);
  for (const Attachment& attachment : in.attachments) {
    codec::ToProto(attachment, out->add_attachments());
  }
  // The system event is only meaningful on system messages; leaving it unset elsewhere keeps
  // user messages small on the wire.
  if (in.kind == MessageKind::kSystem) {
    SystemEventToProto(std::forward<M>(in).system, out->mutable_system());
  }
}

}  // namespace

void ToProto(const Message& in, v1::Message* out) { MessageToProto(in, out); }

void ToProto(Message&& in, v1::Message* out) { MessageToProto(std::move(in), out); }

Message FromProto(const v1::Message& in) {
  Message out;
  out.conversation_id = in.conversation_id();
  out.seq = in.seq();
  out.message_id = in.message_id();
  out.sender = in.sender();
  out.sender_device = in.sender_device();
  out.client_msg_id = in.client_msg_id();
  out.server_time_ms = in.server_time_ms();
  out.kind = EnumOrUnspecified<MessageKind>(in.kind(), v1::MessageKind_MAX);
  out.content_type = in.content_type();
  out.body = in.body();
  out.attachments.reserve(static_cast<size_t>(in.attachments_size()));
  for (const v1::Attachment& attachment : in.attachments()) {
    out.attachments.push_back(FromProto(attachment));
  }
  if (in.has_system()) out.system = FromProto(in.system());
  return out;
}

void ToProto(const ConversationInfo& in, v1::ConversationState* out) {
  out->set_conversation_id(in.conversation_id);
  out->set_kind(static_cast<v1::ConversationKind>(in.kind));
  out->set_title(in.title);
  out->set_peer(in.peer);
  out->set_last_seq(in.last_seq);
  out->set_read_seq(in.read_seq);
  out->set_delivered_seq(in.delivered_seq);
  out->set_unread(in.unread);
  out->set_first_seq(in.first_seq);
  out->set_role(static_cast<v1::Role>(in.role));
  out->set_member_count(in.member_count);
  out->set_last_activity_ms(in.last_activity_ms);
  out->set_removed_at_seq(in.removed_at_seq);
  out->set_peer_last_seen_ms(in.peer_last_seen_ms);
  out->set_retention_ms(in.retention_ms);
  out->set_delivered_all_seq(in.delivered_all_seq);
  out->set_read_all_seq(in.read_all_seq);
}

ConversationInfo FromProto(const v1::ConversationState& in) {
  ConversationInfo out;
  out.conversation_id = in.conversation_id();
  out.kind = EnumOrUnspecified<ConversationKind>(in.kind(), v1::ConversationKind_MAX);
  out.title = in.title();
  out.peer = in.peer();
  out.last_seq = in.last_seq();
  out.read_seq = in.read_seq();
  out.delivered_seq = in.delivered_seq();
  out.unread = in.unread();
  out.first_seq = in.first_seq();
  out.role = EnumOrUnspecified<Role>(in.role(), v1::Role_MAX);
  out.member_count = in.member_count();
  out.last_activity_ms = in.last_activity_ms();
  out.removed_at_seq = in.removed_at_seq();
  out.peer_last_seen_ms = in.peer_last_seen_ms();
  out.retention_ms = in.retention_ms();
  out.delivered_all_seq = in.delivered_all_seq();
  out.read_all_seq = in.read_all_seq();
  return out;
}

v1::Error::Code ToProtoCode(Code code) {
  const int raw = static_cast<int>(code);
  return v1::Error::Code_IsValid(raw) ? static_cast<v1::Error::Code>(raw) : v1::Error::INTERNAL;
}

Code FromProtoCode(v1::Error::Code code) {
  const int raw = static_cast<int>(code);
  // A code this version does not know (a newer server) is reported as Internal, which is
  // retryable, rather than guessed at.
  return v1::Error::Code_IsValid(raw) ? static_cast<Code>(raw) : Code::kInternal;
}

v1::Envelope ErrorEnvelope(uint64_t rid, const Status& status) {
  v1::Envelope envelope;
  envelope.set_rid(rid);
  v1::Error* error = envelope.mutable_error();
  error->set_code(ToProtoCode(status.code()));
  // Messages may quote untrusted input; the field must stay UTF-8 or the reply itself would be
  // undecodable.
  error->set_message(SanitizeUtf8(status.message()));
  error->set_retry_after_ms(status.retry_after_ms());
  return envelope;
}

}  // namespace chat::codec
