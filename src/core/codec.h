// The one codec: Envelope <-> bytes, in protobuf binary (binary frames) or protobuf's JSON
// mapping (text frames), plus Batch packing and the conversions between the wire messages and
// the public types of chat/types.h.
//
// Decoding never throws and never crashes on any input: every failure is an InvalidArgument
// Status whose message names the problem ("too large", "truncated", "invalid UTF-8", "unknown
// message type", "missing required field: send.client_msg_id", ...). The size limit is checked
// before any parsing.
#ifndef CHAT_SRC_CORE_CODEC_H_
#define CHAT_SRC_CORE_CODEC_H_

#include <cstddef>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "chat/status.h"
#include "chat/types.h"
#include "chat/v1/chat.pb.h"

namespace chat::codec {

enum class Format { kBinary, kJson };

// Decodes one envelope. Checks, in order: size <= max_bytes ("too large"), well-formed
// encoding ("truncated", "malformed", "invalid UTF-8", "invalid JSON: ..."), a body is set
// ("unknown message type"). A Batch is decoded whole; nested Batches are refused. Required
// fields are NOT checked here: call Validate() on the result, so a caller can still answer a
// structurally valid request (its rid is known) with an error instead of closing.
Status Decode(std::string_view bytes, Format format, size_t max_bytes, v1::Envelope* out);

// Required fields of client->server bodies; e.g. Hello.token, Send.client_msg_id and a
// recipient, History.conversation_id. Returns InvalidArgument "missing required field: x.y".
Status Validate(const v1::Envelope& envelope);

// Encodes one envelope.
std::string Encode(const v1::Envelope& envelope, Format format);

// Shared, immutable encoded frame: one Deliver encoded once is queued to many sessions.
using Frame = std::shared_ptr<const std::string>;
Frame EncodeShared(const v1::Envelope& envelope, Format format);

// Packs already-encoded envelopes (all in `format`) into one encoded Batch envelope without
// re-parsing them. A single frame is returned unchanged.
std::string PackBatch(std::span<const Frame> frames, Format format);

// Conversions to and from the public types.
void ToProto(const Message& in, v1::Message* out);
// The same, moving `in`'s strings (its system event's too) into `out` instead of copying them,
// for a reply built from a store's result it owns; attachments are still copied.
void ToProto(Message&& in, v1::Message* out);
Message FromProto(const v1::Message& in);
void ToProto(const ConversationInfo& in, v1::ConversationState* out);
ConversationInfo FromProto(const v1::ConversationState& in);
void ToProto(const Attachment& in, v1::Attachment* out);
Attachment FromProto(const v1::Attachment& in);

// The protocol's error code for a Status code (same numbers).
v1::Error::Code ToProtoCode(Code code);
Code FromProtoCode(v1::Error::Code code);

// An Error envelope for `status`, echoing `rid`.
v1::Envelope ErrorEnvelope(uint64_t rid, const Status& status);

}  // namespace chat::codec

#endif  // CHAT_SRC_CORE_CODEC_H_
