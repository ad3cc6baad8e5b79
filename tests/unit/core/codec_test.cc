#include "src/core/codec.h"

#include <doctest/doctest.h>
#include <google/protobuf/descriptor.h>
#include <google/protobuf/util/message_differencer.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace chat::codec {
namespace {

using google::protobuf::Descriptor;
using google::protobuf::FieldDescriptor;
using google::protobuf::Reflection;
using google::protobuf::util::MessageDifferencer;

constexpr size_t kMax = 1 << 20;
constexpr Format kFormats[] = {Format::kBinary, Format::kJson};

const char* FormatName(Format format) { return format == Format::kBinary ? "binary" : "json"; }

// Sets every field of `message` to a non-default value (two elements for repeated fields), so a
// round trip that loses or mangles any field shows up. Values are chosen to stress the JSON
// mapping: 64-bit integers above 2^53, negative int64, bytes that are not UTF-8, non-ASCII text.
void Fill(google::protobuf::Message* message, int depth) {
  const Descriptor* descriptor = message->GetDescriptor();
  const Reflection* reflection = message->GetReflection();
  for (int i = 0; i < descriptor->field_count(); ++i) {
    const FieldDescriptor* field = descriptor->field(i);
    // Envelopes inside a Batch are filled by the caller: a generic fill would nest batches.
    if (field->type() == FieldDescriptor::TYPE_MESSAGE &&
        field->message_type() == v1::Envelope::descriptor()) {
      continue;
    }
    const int count = field->is_repeated() ? 2 : 1;
    for (int n = 0; n < count; ++n) {
      const uint64_t salt = static_cast<uint64_t>(field->number()) * 10 + static_cast<uint64_t>(n);
      switch (field->cpp_type()) {
        case FieldDescriptor::CPPTYPE_STRING: {
          const std::string value = field->type() == FieldDescriptor::TYPE_BYTES
                                        ? std::string("\x00\xff\x80 bin", 7) + std::to_string(salt)
                                        : field->name() + "-\xc3\xa9-" + std::to_string(salt);
          if (field->is_repeated()) {
            reflection->AddString(message, field, value);
          } else {
            reflection->SetString(message, field, value);
          }
          break;
        }
        case FieldDescriptor::CPPTYPE_UINT64: {
          const uint64_t value = (uint64_t{1} << 60) + salt;
          if (field->is_repeated()) {
            reflection->AddUInt64(message, field, value);
          } else {
            reflection->SetUInt64(message, field, value);
          }
          break;
        }
        case FieldDescriptor::CPPTYPE_INT64: {
          const int64_t value = -(int64_t{1} << 55) - static_cast<int64_t>(salt);
          if (field->is_repeated()) {
            reflection->AddInt64(message, field, value);
          } else {
            reflection->SetInt64(message, field, value);
          }
          break;
        }
        case FieldDescriptor::CPPTYPE_UINT32: {
          const uint32_t value = 4'000'000'000u + static_cast<uint32_t>(salt);
          if (field->is_repeated()) {
            reflection->AddUInt32(message, field, value);
          } else {
            reflection->SetUInt32(message, field, value);
          }
          break;
        }
        case FieldDescriptor::CPPTYPE_INT32: {
          const int32_t value = -1000 - static_cast<int32_t>(salt);
          if (field->is_repeated()) {
            reflection->AddInt32(message, field, value);
          } else {
            reflection->SetInt32(message, field, value);
          }
          break;
        }
        case FieldDescriptor::CPPTYPE_BOOL:
          if (field->is_repeated()) {
            reflection->AddBool(message, field, true);
          } else {
            reflection->SetBool(message, field, true);
          }
          break;
        case FieldDescriptor::CPPTYPE_ENUM: {
          const auto* value =
              field->enum_type()->value(field->enum_type()->value_count() - 1 - n % 2);
          if (field->is_repeated()) {
            reflection->AddEnum(message, field, value);
          } else {
            reflection->SetEnum(message, field, value);
          }
          break;
        }
        case FieldDescriptor::CPPTYPE_MESSAGE: {
          if (depth >= 4) break;
          google::protobuf::Message* child = field->is_repeated()
                                                 ? reflection->AddMessage(message, field)
                                                 : reflection->MutableMessage(message, field);
          Fill(child, depth + 1);
          break;
        }
        default:
          FAIL("the schema gained a field type this test does not fill: " << field->full_name());
      }
    }
  }
}

// An envelope whose body is the oneof member `field`, fully populated.
v1::Envelope MakeEnvelope(const FieldDescriptor* field, uint64_t rid) {
  v1::Envelope envelope;
  envelope.set_rid(rid);
  google::protobuf::Message* body = envelope.GetReflection()->MutableMessage(&envelope, field);
  Fill(body, 0);
  if (envelope.body_case() == v1::Envelope::kBatch) {
    v1::Envelope* ping = envelope.mutable_batch()->add_envelopes();
    ping->set_rid(5);
    ping->mutable_ping()->set_client_time_ms(123);
    v1::Envelope* send = envelope.mutable_batch()->add_envelopes();
    send->mutable_send()->set_peer("bob");
    send->mutable_send()->set_client_msg_id("0123456789abcdef");
  }
  return envelope;
}

std::vector<const FieldDescriptor*> BodyFields() {
  const google::protobuf::OneofDescriptor* body =
      v1::Envelope::descriptor()->FindOneofByName("body");
  REQUIRE(body != nullptr);
  std::vector<const FieldDescriptor*> fields;
  for (int i = 0; i < body->field_count(); ++i) fields.push_back(body->field(i));
  return fields;
}

Status DecodeBinary(std::string_view bytes, v1::Envelope* out = nullptr) {
  v1::Envelope scratch;
  return Decode(bytes, Format::kBinary, kMax, out ? out : &scratch);
}

Status DecodeJson(std::string_view bytes, v1::Envelope* out = nullptr) {
  v1::Envelope scratch;
  return Decode(bytes, Format::kJson, kMax, out ? out : &scratch);
}

void CheckInvalid(const Status& status, std::string_view message) {
  CHECK(status.code() == Code::kInvalidArgument);
  CHECK(status.message() == message);
}

v1::Envelope Ping(uint64_t rid) {
  v1::Envelope envelope;
  envelope.set_rid(rid);
  envelope.mutable_ping()->set_client_time_ms(static_cast<int64_t>(rid) * 1000);
  return envelope;
}

TEST_CASE("codec: every envelope body kind round-trips in both encodings") {
  const std::vector<const FieldDescriptor*> fields = BodyFields();
  // The oneof has 34 members today; if this changes, the loop below covers the new ones too.
  CHECK(fields.size() >= 34);
  for (const FieldDescriptor* field : fields) {
    const v1::Envelope original = MakeEnvelope(field, 42);
    CAPTURE(field->name());
    REQUIRE(static_cast<int>(original.body_case()) == field->number());
    for (Format format : kFormats) {
      CAPTURE(FormatName(format));
      const std::string bytes = Encode(original, format);
      v1::Envelope decoded;
      const Status status = Decode(bytes, format, kMax, &decoded);
      REQUIRE_MESSAGE(status.ok(), status.ToString());
      CHECK(static_cast<int>(decoded.body_case()) == field->number());
      CHECK(decoded.rid() == 42);
      std::string difference;
      MessageDifferencer differencer;
      differencer.ReportDifferencesToString(&difference);
      CHECK_MESSAGE(differencer.Compare(original, decoded), difference);
      // Shared frames carry the same bytes as Encode.
      CHECK(*EncodeShared(original, format) == bytes);
    }
  }
}

TEST_CASE("codec: JSON output uses lowerCamelCase names and 64-bit integers as strings") {
  v1::Envelope envelope;
  envelope.set_rid(9);
  envelope.mutable_send()->set_conversation_id(uint64_t{1} << 60);
  envelope.mutable_send()->set_client_msg_id("abcdefghijklmnop");
  const std::string json = Encode(envelope, Format::kJson);
  CHECK(
      json ==
      R"({"rid":"9","send":{"conversationId":"1152921504606846976","clientMsgId":"abcdefghijklmnop"}})");
}

TEST_CASE("codec: JSON input accepts both lowerCamelCase and snake_case field names") {
  for (const char* json :
       {R"({"rid":"3","hello":{"token":"t","deviceId":"d","protocolVersion":1}})",
        R"({"rid":3,"hello":{"token":"t","device_id":"d","protocol_version":1}})"}) {
    CAPTURE(json);
    v1::Envelope envelope;
    REQUIRE(DecodeJson(json, &envelope).ok());
    CHECK(envelope.rid() == 3);
    CHECK(envelope.hello().token() == "t");
    CHECK(envelope.hello().device_id() == "d");
    CHECK(envelope.hello().protocol_version() == 1);
  }
}

TEST_CASE("codec: JSON input ignores unknown fields next to a known body") {
  v1::Envelope envelope;
  REQUIRE(DecodeJson(R"({"rid":"1","futureField":{"x":1},"ping":{"clientTimeMs":"5"}})", &envelope)
              .ok());
  CHECK(envelope.ping().client_time_ms() == 5);
}

TEST_CASE("codec: PackBatch output decodes to the same envelopes in order") {
  std::vector<v1::Envelope> originals;
  for (uint64_t rid = 1; rid <= 5; ++rid) originals.push_back(Ping(rid));
  originals.push_back(MakeEnvelope(v1::Envelope::descriptor()->FindFieldByName("deliver"), 0));
  originals.push_back(MakeEnvelope(v1::Envelope::descriptor()->FindFieldByName("send_ack"), 77));
  for (Format format : kFormats) {
    CAPTURE(FormatName(format));
    std::vector<Frame> frames;
    for (const v1::Envelope& envelope : originals) frames.push_back(EncodeShared(envelope, format));
    const std::string packed = PackBatch(frames, format);
    v1::Envelope decoded;
    const Status status = Decode(packed, format, kMax, &decoded);
    REQUIRE_MESSAGE(status.ok(), status.ToString());
    REQUIRE(decoded.body_case() == v1::Envelope::kBatch);
    REQUIRE(decoded.batch().envelopes_size() == static_cast<int>(originals.size()));
    for (size_t i = 0; i < originals.size(); ++i) {
      CAPTURE(i);
      CHECK(
          MessageDifferencer::Equals(originals[i], decoded.batch().envelopes(static_cast<int>(i))));
    }
    // The hand-written frame is exactly what protobuf would produce for the same Batch.
    if (format == Format::kBinary) {
      v1::Envelope expected;
      for (const v1::Envelope& envelope : originals) {
        *expected.mutable_batch()->add_envelopes() = envelope;
      }
      CHECK(packed == expected.SerializeAsString());
    }
  }
}

TEST_CASE("codec: PackBatch returns a single frame unchanged and packs none as an empty batch") {
  for (Format format : kFormats) {
    CAPTURE(FormatName(format));
    const Frame one = EncodeShared(Ping(1), format);
    CHECK(PackBatch(std::vector<Frame>{one}, format) == *one);
    // Null frames are skipped rather than dereferenced.
    CHECK(PackBatch(std::vector<Frame>{nullptr, one, nullptr}, format) == *one);

    v1::Envelope decoded;
    REQUIRE(Decode(PackBatch({}, format), format, kMax, &decoded).ok());
    CHECK(decoded.body_case() == v1::Envelope::kBatch);
    CHECK(decoded.batch().envelopes_size() == 0);
  }
}

TEST_CASE("codec: PackBatch of large frames uses multi-byte lengths correctly") {
  v1::Envelope big;
  big.mutable_deliver()->mutable_message()->set_body(std::string(300'000, 'x'));
  for (Format format : kFormats) {
    CAPTURE(FormatName(format));
    std::vector<Frame> frames = {EncodeShared(big, format), EncodeShared(Ping(2), format)};
    v1::Envelope decoded;
    REQUIRE(Decode(PackBatch(frames, format), format, 1 << 21, &decoded).ok());
    REQUIRE(decoded.batch().envelopes_size() == 2);
    CHECK(decoded.batch().envelopes(0).deliver().message().body().size() == 300'000);
    CHECK(decoded.batch().envelopes(1).rid() == 2);
  }
}

TEST_CASE("codec: a frame over the limit is refused before parsing") {
  const std::string bytes = Encode(Ping(1), Format::kBinary);
  v1::Envelope envelope;
  CHECK(Decode(bytes, Format::kBinary, bytes.size(), &envelope).ok());
  CheckInvalid(Decode(bytes, Format::kBinary, bytes.size() - 1, &envelope),
               "too large (" + std::to_string(bytes.size()) + " > " +
                   std::to_string(bytes.size() - 1) + " bytes)");
  // Garbage that is too large is reported as too large: the size is checked first.
  CheckInvalid(Decode(std::string(11, '\xff'), Format::kJson, 10, &envelope),
               "too large (11 > 10 bytes)");
  CHECK(envelope.body_case() == v1::Envelope::BODY_NOT_SET);
}

TEST_CASE("codec: garbage bytes are malformed") {
  // Field number 0, wire types 6 and 7, and an end-group tag with no group open (at the top
  // level and inside hello).
  for (std::string bytes : {std::string("\x00", 1), std::string("\x0e"), std::string("\x0f\x01"),
                            std::string("\x0c"), std::string("\x08\x01\x52\x01\x0c")}) {
    CAPTURE(bytes.size());
    CheckInvalid(DecodeBinary(bytes), "malformed");
  }
  // A varint longer than ten bytes.
  CheckInvalid(DecodeBinary(std::string("\x08") + std::string(11, '\x80') + "\x01"), "malformed");
}

TEST_CASE("codec: a cut-off protobuf frame is truncated") {
  v1::Envelope envelope;
  envelope.set_rid(1);
  envelope.mutable_deliver()->mutable_message()->set_sender("alice");
  envelope.mutable_deliver()->mutable_message()->set_body("hello");
  const std::string bytes = Encode(envelope, Format::kBinary);
  // Every cut inside the deliver body (after its tag) leaves a length that runs past the end.
  for (size_t cut = 3; cut < bytes.size(); ++cut) {
    CAPTURE(cut);
    CheckInvalid(DecodeBinary(bytes.substr(0, cut)), "truncated");
  }
  CheckInvalid(DecodeBinary("\x08\x80"), "truncated");      // varint without its last byte
  CheckInvalid(DecodeBinary("\x09\x01\x02"), "truncated");  // fixed64 with 2 of 8 bytes
  CheckInvalid(DecodeBinary("\x0d\x01"), "truncated");      // fixed32 with 1 of 4 bytes
  CheckInvalid(DecodeBinary("\x0b\x08\x01"), "truncated");  // group never closed
}

TEST_CASE("codec: invalid UTF-8 in a string field names the field") {
  // hello (field 10) { token (field 1): 0xff }
  CheckInvalid(DecodeBinary(std::string("\x52\x03\x0a\x01\xff", 5)),
               "invalid UTF-8 in field hello.token");

  v1::Envelope deliver;
  deliver.mutable_deliver()->mutable_message()->set_sender("\xc3\x28");  // bad continuation
  CheckInvalid(DecodeBinary(deliver.SerializeAsString()),
               "invalid UTF-8 in field deliver.message.sender");

  v1::Envelope batch;
  batch.mutable_batch()->add_envelopes()->mutable_send()->set_client_msg_id("\xed\xa0\x80");
  CheckInvalid(DecodeBinary(batch.SerializeAsString()),
               "invalid UTF-8 in field batch.envelopes.send.client_msg_id");

  // bytes fields carry anything.
  v1::Envelope send;
  send.mutable_send()->set_body("\xff\xfe");
  CHECK(DecodeBinary(send.SerializeAsString()).ok());

  CheckInvalid(DecodeJson("{\"hello\":{\"token\":\"\xff\"}}"), "invalid UTF-8 in JSON text");
}

TEST_CASE("codec: invalid JSON is refused with protobuf's reason") {
  for (const char* json : {"", "{", "[]", "nul", R"({"hello":)", R"({"ping":{}} x)",
                           R"({"rid":"-1","ping":{}})", R"({"send":{"body":"!!"}})",
                           R"({"hello":{},"ping":{}})", R"({"hello":{"token":"\ud800"}})"}) {
    CAPTURE(json);
    const Status status = DecodeJson(json);
    CHECK(status.code() == Code::kInvalidArgument);
    CHECK(status.message().starts_with("invalid JSON: "));
    CHECK(status.message().size() > std::string_view("invalid JSON: ").size());
    // One line: the excerpt and caret protobuf adds are cut off.
    CHECK(status.message().find('\n') == std::string_view::npos);
  }
}

TEST_CASE("codec: an envelope without a body is an unknown message type") {
  CheckInvalid(DecodeBinary(""), "unknown message type");
  CheckInvalid(DecodeBinary("\x08\x05"), "unknown message type");  // rid only
  // Only an unknown field (number 1000, varint).
  CheckInvalid(DecodeBinary("\xc0\x3e\x01"), "unknown message type");
  CheckInvalid(DecodeJson("{}"), "unknown message type");
  CheckInvalid(DecodeJson(R"({"rid":"5"})"), "unknown message type");
  CheckInvalid(DecodeJson(R"({"somethingNew":{"a":1}})"), "unknown message type");
  // Inside a batch too.
  CheckInvalid(DecodeJson(R"({"batch":{"envelopes":[{"ping":{}},{"rid":"2"}]}})"),
               "unknown message type");
}

TEST_CASE("codec: a batch inside a batch is refused") {
  v1::Envelope envelope;
  envelope.mutable_batch()->add_envelopes()->mutable_ping();
  envelope.mutable_batch()->add_envelopes()->mutable_batch()->add_envelopes()->mutable_ping();
  for (Format format : kFormats) {
    CAPTURE(FormatName(format));
    v1::Envelope decoded;
    CheckInvalid(Decode(Encode(envelope, format), format, kMax, &decoded), "nested batch");
    CHECK(decoded.body_case() == v1::Envelope::BODY_NOT_SET);
  }
}

TEST_CASE("codec: deeply nested input is refused without exhausting the stack") {
  // Each level is a Batch holding the previous level and a small ping, so the size grows only
  // linearly while the nesting goes far beyond protobuf's recursion limit.
  const Frame ping = EncodeShared(Ping(1), Format::kBinary);
  std::string bytes = *ping;
  for (int i = 0; i < 300; ++i) {
    const std::vector<Frame> frames = {std::make_shared<const std::string>(bytes), ping};
    bytes = PackBatch(frames, Format::kBinary);
  }
  CheckInvalid(DecodeBinary(bytes), "malformed");

  std::string json = R"({"ping":{}})";
  for (int i = 0; i < 300; ++i) json = R"({"batch":{"envelopes":[)" + json + "]}}";
  CHECK(DecodeJson(json).code() == Code::kInvalidArgument);

  // Two levels are within every limit and reach the batch rule.
  CheckInvalid(DecodeJson(R"({"batch":{"envelopes":[{"batch":{"envelopes":[{"ping":{}}]}}]}})"),
               "nested batch");
}

TEST_CASE("codec: arbitrary bytes never crash the decoder") {
  std::mt19937_64 random(12345);
  std::vector<std::string> seeds;
  for (const FieldDescriptor* field : BodyFields()) {
    seeds.push_back(Encode(MakeEnvelope(field, 1), Format::kBinary));
  }
  int refused = 0;
  for (int i = 0; i < 20'000; ++i) {
    std::string bytes = seeds[random() % seeds.size()];
    // Flip, cut or splice: most results are invalid, and none may crash or leak.
    switch (random() % 3) {
      case 0:
        bytes[random() % bytes.size()] = static_cast<char>(random());
        break;
      case 1:
        bytes.resize(random() % bytes.size());
        break;
      default:
        bytes.insert(random() % bytes.size(), 1, static_cast<char>(random()));
        break;
    }
    for (Format format : kFormats) {
      v1::Envelope envelope;
      const Status status = Decode(bytes, format, kMax, &envelope);
      if (!status.ok()) {
        ++refused;
        REQUIRE(status.code() == Code::kInvalidArgument);
        REQUIRE(envelope.body_case() == v1::Envelope::BODY_NOT_SET);
      }
    }
  }
  CHECK(refused > 0);
}

TEST_CASE("codec: Decode leaves required fields to Validate") {
  v1::Envelope envelope;
  REQUIRE(DecodeJson(R"({"rid":"4","hello":{"deviceId":"d"}})", &envelope).ok());
  CHECK(envelope.rid() == 4);
  CheckInvalid(Validate(envelope), "missing required field: hello.token");
}

struct ValidateCase {
  const char* json;
  const char* error;  // nullptr: valid
};

TEST_CASE("codec: Validate checks the required fields of each client request") {
  const ValidateCase cases[] = {
      {R"({"hello":{"token":"t","deviceId":"d"}})", nullptr},
      {R"({"hello":{"deviceId":"d"}})", "missing required field: hello.token"},
      {R"({"hello":{"token":"t"}})", "missing required field: hello.device_id"},
      {R"({"send":{"peer":"bob","clientMsgId":"c"}})", nullptr},
      {R"({"send":{"conversationId":"7","clientMsgId":"c"}})", nullptr},
      {R"({"send":{"clientMsgId":"c"}})",
       "missing required field: send.conversation_id or send.peer"},
      {R"({"send":{"conversationId":"0","clientMsgId":"c"}})",
       "missing required field: send.conversation_id or send.peer"},
      {R"({"send":{"peer":"","clientMsgId":"c"}})",
       "missing required field: send.conversation_id or send.peer"},
      {R"({"send":{"peer":"bob"}})", "missing required field: send.client_msg_id"},
      {R"({"receipt":{"readSeq":"3"}})", "missing required field: receipt.conversation_id"},
      {R"({"receipt":{"conversationId":"1","readSeq":"3"}})", nullptr},
      {R"({"history":{}})", "missing required field: history.conversation_id"},
      {R"({"history":{"conversationId":"1"}})", nullptr},
      {R"({"typing":{"active":true}})", "missing required field: typing.conversation_id"},
      {R"({"subscribe":{}})", "missing required field: subscribe.conversation_id"},
      {R"({"unsubscribe":{}})", "missing required field: unsubscribe.conversation_id"},
      {R"({"getReceipts":{}})", "missing required field: get_receipts.conversation_id"},
      {R"({"leave":{}})", "missing required field: leave.conversation_id"},
      {R"({"leave":{"conversationId":"2"}})", nullptr},
      {R"({"setRetention":{"retentionMs":"-1"}})",
       "missing required field: set_retention.conversation_id"},
      {R"({"setRetention":{"conversationId":"2"}})", nullptr},
      {R"({"setRetention":{"conversationId":"2","retentionMs":"-1"}})", nullptr},
      {R"({"renameGroup":{"title":"x"}})", "missing required field: rename_group.conversation_id"},
      {R"({"renameGroup":{"conversationId":"2"}})", "missing required field: rename_group.title"},
      {R"({"renameGroup":{"conversationId":"2","title":"x"}})", nullptr},
      {R"({"addMembers":{"users":["a"]}})", "missing required field: add_members.conversation_id"},
      {R"({"addMembers":{"conversationId":"2"}})", "missing required field: add_members.users"},
      {R"({"addMembers":{"conversationId":"2","users":["a"]}})", nullptr},
      {R"({"removeMembers":{"conversationId":"2"}})",
       "missing required field: remove_members.users"},
      {R"({"removeMembers":{"users":["a"]}})",
       "missing required field: remove_members.conversation_id"},
      {R"({"setRole":{"user":"a","role":"ROLE_ADMIN"}})",
       "missing required field: set_role.conversation_id"},
      {R"({"setRole":{"conversationId":"2","role":"ROLE_ADMIN"}})",
       "missing required field: set_role.user"},
      {R"({"setRole":{"conversationId":"2","user":"a"}})", "missing required field: set_role.role"},
      {R"({"setRole":{"conversationId":"2","user":"a","role":"ROLE_MEMBER"}})", nullptr},
      {R"({"createGroup":{"title":"t"}})", "missing required field: create_group.kind"},
      {R"({"createGroup":{"kind":"CONVERSATION_KIND_DIRECT"}})",
       "create_group.kind must be GROUP or CHANNEL"},
      {R"({"createGroup":{"kind":"CONVERSATION_KIND_GROUP"}})", nullptr},
      {R"({"createGroup":{"kind":"CONVERSATION_KIND_CHANNEL"}})", nullptr},
      {R"({"presenceSubscribe":{}})", "missing required field: presence_subscribe.users"},
      {R"({"presenceSubscribe":{"users":["a"]}})", nullptr},
      {R"({"sync":{}})", nullptr},
      {R"({"ping":{}})", nullptr},
      {R"({"batch":{"envelopes":[{"ping":{}},{"history":{}}]}})",
       "missing required field: history.conversation_id"},
      {R"({"batch":{"envelopes":[{"ping":{}},{"history":{"conversationId":"1"}}]}})", nullptr},
  };
  for (const ValidateCase& c : cases) {
    CAPTURE(c.json);
    v1::Envelope envelope;
    const Status decoded = DecodeJson(c.json, &envelope);
    REQUIRE_MESSAGE(decoded.ok(), decoded.ToString());
    const Status status = Validate(envelope);
    if (c.error == nullptr) {
      CHECK_MESSAGE(status.ok(), status.ToString());
    } else {
      CheckInvalid(status, c.error);
    }
  }
}

// A user message with every field set and two attachments.
Message SampleMessage() {
  Message user;
  user.conversation_id = 7;
  user.seq = 12;
  user.message_id = 48170521123651584;
  user.sender = "alice";
  user.sender_device = "laptop";
  user.client_msg_id = "0123456789abcdef";
  user.server_time_ms = 1'763'900'000'123;
  user.kind = MessageKind::kUser;
  user.content_type = "text/plain";
  user.body = std::string("hi\0there", 8);
  user.attachments.push_back(
      Attachment{"https://x/y", "image/png", 1234, std::string(32, 'h'), "y.png", 640, 480, 0});
  user.attachments.push_back(Attachment{"https://x/z", "audio/ogg", 99, "", "z.ogg", 0, 0, 5000});
  return user;
}

TEST_CASE("codec: Message converts to the wire type and back") {
  const Message user = SampleMessage();

  v1::Message wire;
  ToProto(user, &wire);
  CHECK(wire.body() == user.body);
  CHECK_FALSE(wire.has_system());
  const Message back = FromProto(wire);
  CHECK(back.conversation_id == 7);
  CHECK(back.seq == 12);
  CHECK(back.message_id == user.message_id);
  CHECK(back.sender == "alice");
  CHECK(back.sender_device == "laptop");
  CHECK(back.client_msg_id == user.client_msg_id);
  CHECK(back.server_time_ms == user.server_time_ms);
  CHECK(back.kind == MessageKind::kUser);
  CHECK(back.content_type == "text/plain");
  CHECK(back.body == user.body);
  REQUIRE(back.attachments.size() == 2);
  CHECK(back.attachments[0].url == "https://x/y");
  CHECK(back.attachments[0].mime_type == "image/png");
  CHECK(back.attachments[0].size == 1234);
  CHECK(back.attachments[0].sha256 == std::string(32, 'h'));
  CHECK(back.attachments[0].name == "y.png");
  CHECK(back.attachments[0].width == 640);
  CHECK(back.attachments[0].height == 480);
  CHECK(back.attachments[1].duration_ms == 5000);

  Message system;
  system.conversation_id = 3;
  system.kind = MessageKind::kSystem;
  system.system.type = SystemEvent::Type::kRoleChanged;
  system.system.actor = "alice";
  system.system.users = {"bob", "carol"};
  system.system.title = "team";
  system.system.role = Role::kAdmin;
  system.system.seq = 77;
  system.system.retention_ms = -1;
  v1::Message system_wire;
  ToProto(system, &system_wire);
  CHECK(system_wire.has_system());
  const Message system_back = FromProto(system_wire);
  CHECK(system_back.kind == MessageKind::kSystem);
  CHECK(system_back.system.type == SystemEvent::Type::kRoleChanged);
  CHECK(system_back.system.actor == "alice");
  CHECK(system_back.system.users == std::vector<UserId>{"bob", "carol"});
  CHECK(system_back.system.title == "team");
  CHECK(system_back.system.role == Role::kAdmin);
  CHECK(system_back.system.seq == 77);
  CHECK(system_back.system.retention_ms == -1);
}

TEST_CASE("codec: ConversationInfo converts to the wire type and back") {
  ConversationInfo info;
  info.conversation_id = 5;
  info.kind = ConversationKind::kChannel;
  info.title = "news";
  info.peer = "";
  info.last_seq = 100;
  info.read_seq = 90;
  info.delivered_seq = 95;
  info.unread = 10;
  info.first_seq = 3;
  info.role = Role::kMember;
  info.member_count = 4000;
  info.last_activity_ms = 1'763'900'000'000;
  info.retention_ms = -1;
  v1::ConversationState wire;
  ToProto(info, &wire);
  const ConversationInfo back = FromProto(wire);
  CHECK(back.conversation_id == 5);
  CHECK(back.kind == ConversationKind::kChannel);
  CHECK(back.title == "news");
  CHECK(back.peer.empty());
  CHECK(back.last_seq == 100);
  CHECK(back.read_seq == 90);
  CHECK(back.delivered_seq == 95);
  CHECK(back.unread == 10);
  CHECK(back.first_seq == 3);
  CHECK(back.role == Role::kMember);
  CHECK(back.member_count == 4000);
  CHECK(back.last_activity_ms == 1'763'900'000'000);
  CHECK(back.retention_ms == -1);

  ConversationInfo direct;
  direct.kind = ConversationKind::kDirect;
  direct.peer = "bob";
  direct.peer_last_seen_ms = 1'763'900'123'456;
  ToProto(direct, &wire);
  CHECK(FromProto(wire).peer == "bob");
  CHECK(FromProto(wire).kind == ConversationKind::kDirect);
  CHECK(FromProto(wire).peer_last_seen_ms == 1'763'900'123'456);
}

TEST_CASE("codec: the lowest watermarks go with a conversation's state, and a cursor's claims") {
  ConversationInfo info;
  info.conversation_id = 8;
  info.kind = ConversationKind::kGroup;
  info.last_seq = 12;
  info.delivered_all_seq = 11;
  info.read_all_seq = 9;
  v1::ConversationState wire;
  ToProto(info, &wire);
  CHECK(wire.delivered_all_seq() == 11);
  CHECK(wire.read_all_seq() == 9);
  const ConversationInfo back = FromProto(wire);
  CHECK(back.delivered_all_seq == 11);
  CHECK(back.read_all_seq == 9);

  // A cursor that names its marks keeps naming them, 0 included, in both encodings; one that
  // does not (a client that predates them) names none.
  for (const Format format : {Format::kBinary, Format::kJson}) {
    CAPTURE(static_cast<int>(format));
    v1::Envelope envelope;
    envelope.set_rid(3);
    v1::Cursor* named = envelope.mutable_sync()->add_cursors();
    named->set_conversation_id(8);
    named->set_seq(12);
    named->set_delivered_all_seq(0);
    named->set_read_all_seq(7);
    envelope.mutable_sync()->add_cursors()->set_conversation_id(9);
    v1::Envelope decoded;
    REQUIRE(Decode(Encode(envelope, format), format, kMax, &decoded).ok());
    REQUIRE(decoded.sync().cursors_size() == 2);
    const v1::Cursor& got = decoded.sync().cursors(0);
    CHECK(got.has_delivered_all_seq());
    CHECK(got.delivered_all_seq() == 0);
    CHECK(got.has_read_all_seq());
    CHECK(got.read_all_seq() == 7);
    CHECK_FALSE(decoded.sync().cursors(1).has_delivered_all_seq());
    CHECK_FALSE(decoded.sync().cursors(1).has_read_all_seq());
  }
}

TEST_CASE("codec: enum values from a newer peer map to unspecified") {
  // proto3 enums are open: a newer peer may send values this build does not know.
  v1::Message wire;
  wire.set_kind(static_cast<v1::MessageKind>(42));
  wire.mutable_system()->set_type(static_cast<v1::SystemEvent::Type>(99));
  wire.mutable_system()->set_role(static_cast<v1::Role>(-3));
  const Message message = FromProto(wire);
  CHECK(message.kind == MessageKind::kUnspecified);
  CHECK(message.system.type == SystemEvent::Type::kUnspecified);
  CHECK(message.system.role == Role::kUnspecified);

  v1::ConversationState state;
  state.set_kind(static_cast<v1::ConversationKind>(17));
  state.set_role(static_cast<v1::Role>(8));
  CHECK(FromProto(state).kind == ConversationKind::kUnspecified);
  CHECK(FromProto(state).role == Role::kUnspecified);
}

TEST_CASE("codec: status codes map to the protocol's codes and back") {
  for (int raw = 0; raw <= 12; ++raw) {
    const auto code = static_cast<Code>(raw);
    CAPTURE(raw);
    CHECK(static_cast<int>(ToProtoCode(code)) == raw);
    CHECK(FromProtoCode(ToProtoCode(code)) == code);
    CHECK(v1::Error::Code_Name(ToProtoCode(code)) == CodeName(code));
  }
  CHECK(FromProtoCode(static_cast<v1::Error::Code>(40)) == Code::kInternal);
  CHECK(ToProtoCode(static_cast<Code>(40)) == v1::Error::INTERNAL);
}

TEST_CASE("codec: ErrorEnvelope carries rid, code, message and retry_after_ms") {
  Status status = ResourceExhausted("rate limited");
  status.set_retry_after_ms(1500);
  const v1::Envelope envelope = ErrorEnvelope(17, status);
  CHECK(envelope.rid() == 17);
  REQUIRE(envelope.body_case() == v1::Envelope::kError);
  CHECK(envelope.error().code() == v1::Error::RESOURCE_EXHAUSTED);
  CHECK(envelope.error().message() == "rate limited");
  CHECK(envelope.error().retry_after_ms() == 1500);
  CHECK(
      Encode(envelope, Format::kJson) ==
      R"({"rid":"17","error":{"code":"RESOURCE_EXHAUSTED","message":"rate limited","retryAfterMs":1500}})");
}

TEST_CASE("codec: ErrorEnvelope keeps an error message quoting bad bytes decodable") {
  const v1::Envelope envelope = ErrorEnvelope(1, InvalidArgument("unknown user \xff\xfe"));
  CHECK(envelope.error().message() == "unknown user \xef\xbf\xbd\xef\xbf\xbd");
  for (Format format : kFormats) {
    CAPTURE(FormatName(format));
    v1::Envelope decoded;
    REQUIRE(Decode(Encode(envelope, format), format, kMax, &decoded).ok());
    CHECK(decoded.error().message() == envelope.error().message());
  }
}

TEST_CASE("codec: a string field holding bytes that are not UTF-8 still encodes decodably") {
  // Strings are only UTF-8-checked when parsed; a bug that puts raw bytes into a string field
  // must still produce frames the peer can decode and match to its request. protobuf's JSON
  // printer drops the ill-formed bytes.
  v1::Envelope envelope;
  envelope.set_rid(31);
  envelope.mutable_welcome()->set_user_id(
      "a\xff"
      "b\xc3");
  v1::Envelope decoded;
  REQUIRE(DecodeJson(Encode(envelope, Format::kJson), &decoded).ok());
  CHECK(decoded.rid() == 31);
  CHECK(decoded.welcome().user_id() == "ab");
}

TEST_CASE("codec: a Message moved into its proto gives the same proto as a copied one") {
  // Strings past the inline buffer, a system event with many members, attachments.
  Message m = SampleMessage();
  m.sender = "a-sender-id-longer-than-fifteen-bytes";
  m.sender_device = "a-device-id-longer-than-fifteen-bytes";
  m.kind = MessageKind::kSystem;
  m.body = std::string(300, 'b');
  m.system.type = SystemEvent::Type::kMembersAdded;
  m.system.actor = "an-actor-id-longer-than-fifteen-bytes";
  for (int i = 0; i < 50; ++i) {
    m.system.users.push_back("a-member-id-longer-than-15-" + std::to_string(i));
  }
  m.system.title = "a title";
  m.system.seq = 41;

  v1::Message copied;
  ToProto(m, &copied);
  Message moving = m;
  v1::Message moved;
  ToProto(std::move(moving), &moved);
  CHECK(google::protobuf::util::MessageDifferencer::Equals(copied, moved));
  CHECK(moved.system().users_size() == 50);
  CHECK(moved.sender() == m.sender);
  CHECK(moved.body() == m.body);
  // And the conversion back gives the original.
  const Message back = FromProto(moved);
  CHECK(back.system.users == m.system.users);
  CHECK(back.attachments.size() == 2);
  CHECK(back.sender_device == m.sender_device);
}

}  // namespace
}  // namespace chat::codec
