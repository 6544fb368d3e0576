// Command-line demo of a C++ client for Tandem's gateway: Embed, Classify, EmbedStream, streamed Generate and rich
// errors.
// Every command prints JSON on stdout (the same shapes as clients/node/cli.js), so scripts and tests can read it.

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <iterator>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>

#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"
#include "tandem/gateway/v1/gateway.grpc.pb.h"
#include "tandem/generation/v1/generation.pb.h"

namespace {

using tandem::gateway::v1::GatewayService;

constexpr const char* kUsage =
    R"(usage: tandem_client [--target HOST:PORT] [--model NAME] [--top-k N] [generation options] COMMAND [TEXT...]

  embed TEXT...     Embed; prints the EmbedResponse as JSON (embeddings[i].values is the vector of TEXT i)
  classify TEXT...  Classify with --model; prints the ClassifyResponse as JSON
  stream TEXT...    EmbedStream, one request per TEXT with ids r0, r1, ...; prints one JSON line per response
  generate PROMPT   Generate with --model (a text-generation model); prints each delta as it arrives, one JSON
                    line {"text", "token_ids"} each, then {"finish_reason" (stop, length or stop_sequence),
                    "stop_sequence", "usage", "model", "model_version"}. Options: --max-new-tokens N,
                    --temperature T, --seed N, --stop S (repeatable), --chat (send PROMPT as one user message)
  errors            provokes INVALID_ARGUMENT (no inputs), NOT_FOUND (unknown model) and a failed request inside
                    a stream; prints the code, message and decoded google.rpc details of each, one JSON line each

--target defaults to 127.0.0.1:50051; --model to the server's default model.
)";

constexpr auto kTimeout = std::chrono::seconds(30);
constexpr auto kGenerateTimeout = std::chrono::seconds(120);  // a whole generation, however many tokens it takes
constexpr int kMaxMessageBytes = 64 * 1024 * 1024;  // the server's limit; gRPC's default receive limit is 4 MiB

// gRPC C++ has no public name table for status codes; these are the canonical names, indexed by number.
const char* CodeName(int code) {
  static const char* const kNames[] = {
      "OK",                   // 0
      "CANCELLED",            // 1
      "UNKNOWN",              // 2
      "INVALID_ARGUMENT",     // 3
      "DEADLINE_EXCEEDED",    // 4
      "NOT_FOUND",            // 5
      "ALREADY_EXISTS",       // 6
      "PERMISSION_DENIED",    // 7
      "RESOURCE_EXHAUSTED",   // 8
      "FAILED_PRECONDITION",  // 9
      "ABORTED",              // 10
      "OUT_OF_RANGE",         // 11
      "UNIMPLEMENTED",        // 12
      "INTERNAL",             // 13
      "UNAVAILABLE",          // 14
      "DATA_LOSS",            // 15
      "UNAUTHENTICATED",      // 16
  };
  return code >= 0 && code < static_cast<int>(std::size(kNames)) ? kNames[code] : "UNKNOWN";
}

// A JSON string literal; error messages are free text, so they need escaping.
std::string Quote(const std::string& text) {
  std::string out = "\"";
  for (unsigned char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          out += buf;
        } else {
          out += static_cast<char>(c);  // UTF-8 passes through unchanged
        }
    }
  }
  return out + "\"";
}

// Responses are printed as proto3 JSON with the .proto's field names, as the Node client prints them.
void PrintMessage(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  std::string json;
  if (!google::protobuf::util::MessageToJsonString(message, &json, options).ok()) {
    throw std::runtime_error("cannot print " + message.GetTypeName() + " as JSON");
  }
  std::cout << json << std::endl;
}

// Code, message and the google.rpc.Status details of a failed call. gRPC C++ hands over the bytes of the
// `grpc-status-details-bin` trailer as Status::error_details(); they are a serialized google.rpc.Status.
std::string DescribeError(const grpc::Status& status) {
  std::string reason = "null", domain = "null", retry_delay = "null", violations;
  google::rpc::Status rich;
  if (!status.error_details().empty() && rich.ParseFromString(status.error_details())) {
    for (const auto& detail : rich.details()) {
      google::rpc::ErrorInfo info;
      google::rpc::BadRequest bad;
      google::rpc::RetryInfo retry;
      if (detail.UnpackTo(&info)) {
        reason = Quote(info.reason());
        domain = Quote(info.domain());
      } else if (detail.UnpackTo(&bad)) {
        for (const auto& v : bad.field_violations()) {
          if (!violations.empty()) violations += ",";
          violations += "{\"field\":" + Quote(v.field()) + ",\"description\":" + Quote(v.description()) + "}";
        }
      } else if (detail.UnpackTo(&retry)) {
        retry_delay = std::to_string(retry.retry_delay().seconds() + retry.retry_delay().nanos() / 1e9);
      }  // other detail types: not used by Tandem, skipped
    }
  }
  const int code = status.error_code();
  return "\"code\":" + std::to_string(code) + ",\"code_name\":" + Quote(CodeName(code)) +
         ",\"message\":" + Quote(status.error_message()) + ",\"reason\":" + reason + ",\"domain\":" + domain +
         ",\"field_violations\":[" + violations + "],\"retry_delay_s\":" + retry_delay;
}

class Client {
 public:
  explicit Client(const std::string& target) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(kMaxMessageBytes);
    args.SetMaxSendMessageSize(kMaxMessageBytes);
    stub_ = GatewayService::NewStub(
        grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args));
  }

  // Every call gets a deadline: without one a call to a stuck server would wait forever.
  static void SetDeadline(grpc::ClientContext* context, std::chrono::seconds timeout = kTimeout) {
    context->set_deadline(std::chrono::system_clock::now() + timeout);
  }

  grpc::Status Embed(const tandem::gateway::v1::EmbedRequest& request,
                     tandem::gateway::v1::EmbedResponse* response) {
    grpc::ClientContext context;
    SetDeadline(&context);
    return stub_->Embed(&context, request, response);
  }

  grpc::Status Classify(const tandem::gateway::v1::ClassifyRequest& request,
                        tandem::gateway::v1::ClassifyResponse* response) {
    grpc::ClientContext context;
    SetDeadline(&context);
    return stub_->Classify(&context, request, response);
  }

  // Sends every request over one EmbedStream and hands each response, in request order, to on_response.
  // A writer thread sends while this thread reads, so a long stream never stalls on flow control.
  template <typename OnResponse>
  grpc::Status EmbedStream(const std::vector<tandem::gateway::v1::EmbedStreamRequest>& requests,
                           OnResponse on_response) {
    grpc::ClientContext context;
    SetDeadline(&context);
    auto stream = stub_->EmbedStream(&context);
    std::thread writer([&] {
      for (const auto& request : requests) {
        if (!stream->Write(request)) break;  // the stream failed; Finish() below says why
      }
      stream->WritesDone();
    });
    tandem::gateway::v1::EmbedStreamResponse response;
    while (stream->Read(&response)) on_response(response);
    writer.join();
    return stream->Finish();
  }

  // Calls Generate and hands each GenerateResponse to on_response as it arrives: text is the new text since the
  // previous one, and the last also has finish_reason, usage and model_version.
  template <typename OnResponse>
  grpc::Status Generate(const tandem::gateway::v1::GenerateRequest& request, OnResponse on_response) {
    grpc::ClientContext context;
    SetDeadline(&context, kGenerateTimeout);
    auto stream = stub_->Generate(&context, request);
    tandem::gateway::v1::GenerateResponse response;
    while (stream->Read(&response)) on_response(response);
    return stream->Finish();
  }

 private:
  std::unique_ptr<GatewayService::Stub> stub_;
};

tandem::gateway::v1::EmbedRequest EmbedRequest(const std::string& model, const std::vector<std::string>& texts) {
  tandem::gateway::v1::EmbedRequest request;
  request.set_model(model);
  for (const auto& text : texts) request.add_inputs(text);
  return request;
}

// The generate command's options; those not given stay unset in the request, so the server's defaults apply.
struct GenerationOptions {
  std::optional<int32_t> max_new_tokens;
  std::optional<float> temperature;
  std::optional<uint64_t> seed;
  std::vector<std::string> stop;
  bool chat = false;
};

tandem::gateway::v1::GenerateRequest GenerateRequest(const std::string& model, const std::string& prompt,
                                                     const GenerationOptions& options) {
  tandem::gateway::v1::GenerateRequest request;
  request.set_model(model);
  if (options.chat) {
    auto* message = request.add_messages();
    message->set_role("user");
    message->set_content(prompt);
  } else {
    request.set_prompt(prompt);
  }
  auto* params = request.mutable_params();
  if (options.max_new_tokens) params->set_max_new_tokens(*options.max_new_tokens);
  if (options.temperature) params->set_temperature(*options.temperature);
  if (options.seed) params->set_seed(*options.seed);
  for (const auto& stop : options.stop) params->add_stop(stop);
  return request;
}

// Streams a generation: one line per delta as it arrives (std::endl flushes each), then why it ended and the token
// counts. Token ids are printed as strings, as proto3 JSON writes int64 and the Node.js client prints them.
grpc::Status ShowGeneration(Client& client, const tandem::gateway::v1::GenerateRequest& request) {
  tandem::gateway::v1::GenerateResponse last;
  bool any = false;
  grpc::Status status = client.Generate(request, [&](const tandem::gateway::v1::GenerateResponse& response) {
    std::string ids;
    for (const auto id : response.token_ids()) {
      ids += (ids.empty() ? "\"" : ",\"") + std::to_string(id) + "\"";
    }
    std::cout << "{\"text\":" << Quote(response.text()) << ",\"token_ids\":[" << ids << "]}" << std::endl;
    last = response;
    any = true;
  });
  if (!status.ok()) return status;
  if (!any || last.finish_reason() == tandem::generation::v1::FINISH_REASON_UNSPECIFIED) {
    throw std::runtime_error("the Generate stream ended without its last message");
  }
  // FINISH_REASON_STOP_SEQUENCE -> stop_sequence, as the other clients print it
  std::string finish_reason = tandem::generation::v1::FinishReason_Name(last.finish_reason()).substr(
      std::string("FINISH_REASON_").size());
  std::transform(finish_reason.begin(), finish_reason.end(), finish_reason.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  const auto& usage = last.usage();
  std::cout << "{\"finish_reason\":" << Quote(finish_reason) << ",\"stop_sequence\":"
            << (last.stop_sequence().empty() ? "null" : Quote(last.stop_sequence()))
            << ",\"usage\":{\"prompt_tokens\":" << usage.prompt_tokens()
            << ",\"generated_tokens\":" << usage.generated_tokens() << ",\"total_tokens\":" << usage.total_tokens()
            << "},\"model\":" << Quote(last.model()) << ",\"model_version\":" << Quote(last.model_version()) << "}"
            << std::endl;
  return status;
}

// The two ways a Tandem error reaches a caller: a failed unary call, and a failed request inside a stream.
int ShowErrors(Client& client, const std::string& model) {
  const std::vector<std::pair<std::string, tandem::gateway::v1::EmbedRequest>> cases = {
      {"empty inputs", EmbedRequest(model, {})},
      {"unknown model", EmbedRequest("no-such-model", {"hello"})},
  };
  for (const auto& [name, request] : cases) {
    tandem::gateway::v1::EmbedResponse response;
    grpc::Status status = client.Embed(request, &response);
    if (status.ok()) {
      std::cerr << name << ": the call succeeded, expected an error" << std::endl;
      return 1;
    }
    std::cout << "{\"case\":" << Quote(name) << "," << DescribeError(status) << "}" << std::endl;
  }
  // A stream reports a failed request in that request's response (StreamError) and goes on with the rest.
  std::vector<tandem::gateway::v1::EmbedStreamRequest> requests(2);
  requests[0].set_id("ok");
  *requests[0].mutable_request() = EmbedRequest(model, {"fine"});
  requests[1].set_id("bad");
  *requests[1].mutable_request() = EmbedRequest(model, {});
  grpc::Status status = client.EmbedStream(requests, [](const tandem::gateway::v1::EmbedStreamResponse& r) {
    if (!r.has_error()) return;
    const auto& error = r.error();
    std::string fields;
    for (const auto& field : error.fields()) {
      fields += (fields.empty() ? "" : ",") + std::string("{\"field\":") + Quote(field) + "}";
    }
    std::cout << "{\"case\":\"stream request with empty inputs\",\"id\":" << Quote(r.id())
              << ",\"code\":" << error.code() << ",\"code_name\":" << Quote(CodeName(error.code()))
              << ",\"message\":" << Quote(error.message()) << ",\"reason\":" << Quote(error.reason())
              << ",\"field_violations\":[" << fields << "]}" << std::endl;
  });
  if (!status.ok()) {
    std::cerr << "{" << DescribeError(status) << "}" << std::endl;
    return 1;
  }
  return 0;
}

int Run(int argc, char** argv) {
  std::string target = "127.0.0.1:50051", model, command;
  int top_k = 0;
  GenerationOptions generation;
  std::vector<std::string> texts;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const bool has_value = i + 1 < argc;
    try {
      if (arg == "--target" && has_value) {
        target = argv[++i];
      } else if (arg == "--model" && has_value) {
        model = argv[++i];
      } else if (arg == "--top-k" && has_value) {
        top_k = std::stoi(argv[++i]);
      } else if (arg == "--max-new-tokens" && has_value) {
        generation.max_new_tokens = std::stoi(argv[++i]);
      } else if (arg == "--temperature" && has_value) {
        generation.temperature = std::stof(argv[++i]);
      } else if (arg == "--seed" && has_value) {
        generation.seed = std::stoull(argv[++i]);
      } else if (arg == "--stop" && has_value) {
        generation.stop.push_back(argv[++i]);
      } else if (arg == "--chat") {
        generation.chat = true;
      } else if (arg == "-h" || arg == "--help") {
        std::cout << kUsage;
        return 0;
      } else if (command.empty()) {
        command = arg;
      } else {
        texts.push_back(arg);
      }
    } catch (const std::logic_error&) {  // std::stoi and friends: not a number, or out of range
      std::cerr << arg << ": not a number: " << Quote(argv[i]) << "\n\n" << kUsage;
      return 2;
    }
  }
  if (command.empty()) {
    std::cerr << kUsage;
    return 2;
  }

  Client client(target);
  grpc::Status status;
  if (command == "embed") {
    tandem::gateway::v1::EmbedResponse response;
    status = client.Embed(EmbedRequest(model, texts), &response);
    if (status.ok()) PrintMessage(response);
  } else if (command == "classify") {
    tandem::gateway::v1::ClassifyRequest request;
    request.set_model(model);
    request.set_top_k(top_k);
    for (const auto& text : texts) request.add_inputs(text);
    tandem::gateway::v1::ClassifyResponse response;
    status = client.Classify(request, &response);
    if (status.ok()) PrintMessage(response);
  } else if (command == "stream") {
    std::vector<tandem::gateway::v1::EmbedStreamRequest> requests(texts.size());
    for (size_t i = 0; i < texts.size(); ++i) {
      requests[i].set_id("r" + std::to_string(i));
      *requests[i].mutable_request() = EmbedRequest(model, {texts[i]});
    }
    status = client.EmbedStream(requests, [](const auto& response) { PrintMessage(response); });
  } else if (command == "generate") {
    if (texts.size() != 1) {
      std::cerr << "generate takes one PROMPT (quote it)\n\n" << kUsage;
      return 2;
    }
    status = ShowGeneration(client, GenerateRequest(model, texts[0], generation));
  } else if (command == "errors") {
    return ShowErrors(client, model);
  } else {
    std::cerr << "unknown command " << Quote(command) << "\n\n" << kUsage;
    return 2;
  }
  if (!status.ok()) {
    std::cerr << "{" << DescribeError(status) << "}" << std::endl;
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Run(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "tandem_client: " << e.what() << std::endl;
    return 1;
  }
}
