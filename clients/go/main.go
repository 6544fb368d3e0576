// Command tandem_client is a demo of a Go client for Tandem's gateway: Embed, Classify, EmbedStream, ListModels,
// streamed Generate and rich errors. Every command prints JSON on stdout (the same shapes as clients/node/cli.js and clients/cpp), so
// scripts and tests can read it.
//
// It builds in GOPATH mode against Debian's Go packages, offline; build.sh generates the stubs from ../../protos.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	gatewayv1 "tandem.dev/go/tandem/gateway/v1"
	generationv1 "tandem.dev/go/tandem/generation/v1"
)

const usage = `usage: tandem_client [--target HOST:PORT] [--model NAME] [--top-k N] [generation options] COMMAND [TEXT...]

  embed TEXT...     Embed; prints the EmbedResponse as JSON (embeddings[i].values is the vector of TEXT i)
  classify TEXT...  Classify with --model; prints the ClassifyResponse as JSON
  stream TEXT...    EmbedStream, one request per TEXT with ids r0, r1, ...; prints one JSON line per response
  models            ListModels; prints the ListModelsResponse as JSON
  generate PROMPT   Generate with --model (a text-generation model); prints each delta as it arrives, one JSON
                    line {"text", "token_ids"} each, then {"finish_reason" (stop, length or stop_sequence),
                    "stop_sequence", "usage", "model", "model_version"}. Options: --max-new-tokens N,
                    --temperature T, --seed N, --stop S (repeatable), --chat (send PROMPT as one user message)
  errors            provokes INVALID_ARGUMENT (no inputs), NOT_FOUND (unknown model) and a failed request inside
                    a stream; prints the code, message and decoded google.rpc details of each, one JSON line each

--target defaults to 127.0.0.1:50051; --model to the server's default model.
`

const (
	timeout         = 30 * time.Second
	generateTimeout = 120 * time.Second // a whole generation, however many tokens it takes
	maxMessageBytes = 64 * 1024 * 1024  // the server's limit; gRPC's default receive limit is 4 MiB
)

// Responses are printed as proto3 JSON with the .proto's field names, as the Node.js and C++ clients print them.
var jsonOptions = protojson.MarshalOptions{UseProtoNames: true}

func printMessage(m proto.Message) error {
	out, err := jsonOptions.Marshal(m)
	if err != nil {
		return fmt.Errorf("cannot print %T as JSON: %w", m, err)
	}
	_, err = fmt.Println(string(out))
	return err
}

// printJSON writes one JSON line; encoding/json keeps struct field order, and HTML escaping is off so that messages
// read as the server wrote them.
func printJSON(w io.Writer, value interface{}) {
	var buf bytes.Buffer
	encoder := json.NewEncoder(&buf)
	encoder.SetEscapeHTML(false)
	if err := encoder.Encode(value); err != nil {
		panic(err) // only plain structs of strings and numbers are printed here
	}
	w.Write(buf.Bytes())
}

// codeName is the canonical name of a status code (INVALID_ARGUMENT), as the other clients print it; Go's own
// codes.Code.String() says InvalidArgument.
func codeName(c int32) string {
	if name, ok := code.Code_name[c]; ok {
		return name
	}
	return "UNKNOWN"
}

type fieldViolation struct {
	Field       string `json:"field"`
	Description string `json:"description"`
}

// callError is a failed call: its code, message and the google.rpc details Tandem attaches.
type callError struct {
	Case            string           `json:"case,omitempty"`
	Code            int32            `json:"code"`
	CodeName        string           `json:"code_name"`
	Message         string           `json:"message"`
	Reason          *string          `json:"reason"`
	Domain          *string          `json:"domain"`
	FieldViolations []fieldViolation `json:"field_violations"`
	RetryDelayS     *float64         `json:"retry_delay_s"`
}

// describeError decodes a failed call. The google.rpc.Status travels in the `grpc-status-details-bin` trailer;
// status.FromError parses it, and Details() unpacks each Any into the errdetails type registered for its URL.
func describeError(err error) callError {
	s, _ := status.FromError(err)
	described := callError{
		Code:            int32(s.Code()),
		CodeName:        codeName(int32(s.Code())),
		Message:         s.Message(),
		FieldViolations: []fieldViolation{},
	}
	for _, detail := range s.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			reason, domain := d.GetReason(), d.GetDomain()
			described.Reason, described.Domain = &reason, &domain
		case *errdetails.BadRequest:
			for _, v := range d.GetFieldViolations() {
				described.FieldViolations = append(described.FieldViolations, fieldViolation{v.GetField(), v.GetDescription()})
			}
		case *errdetails.RetryInfo:
			delay := float64(d.GetRetryDelay().GetSeconds()) + float64(d.GetRetryDelay().GetNanos())/1e9
			described.RetryDelayS = &delay
		} // other detail types (and an undecodable one, which Details() hands over as an error): not used by Tandem
	}
	return described
}

type client struct {
	stub gatewayv1.GatewayServiceClient
}

// Every call gets a deadline: without one a call to a stuck server would wait forever.
func withDeadline() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), timeout)
}

func (c client) embed(request *gatewayv1.EmbedRequest) (*gatewayv1.EmbedResponse, error) {
	ctx, cancel := withDeadline()
	defer cancel()
	return c.stub.Embed(ctx, request)
}

func (c client) classify(request *gatewayv1.ClassifyRequest) (*gatewayv1.ClassifyResponse, error) {
	ctx, cancel := withDeadline()
	defer cancel()
	return c.stub.Classify(ctx, request)
}

func (c client) listModels() (*gatewayv1.ListModelsResponse, error) {
	ctx, cancel := withDeadline()
	defer cancel()
	return c.stub.ListModels(ctx, &gatewayv1.ListModelsRequest{})
}

// embedStream sends every request over one EmbedStream and hands each response, in request order, to onResponse.
// A goroutine sends while this one reads, so a long stream never stalls on flow control.
func (c client) embedStream(requests []*gatewayv1.EmbedStreamRequest, onResponse func(*gatewayv1.EmbedStreamResponse) error) error {
	ctx, cancel := withDeadline()
	defer cancel() // also ends the writer if reading stops early
	stream, err := c.stub.EmbedStream(ctx)
	if err != nil {
		return err
	}
	go func() {
		for _, request := range requests {
			if stream.Send(request) != nil {
				return // the stream failed; Recv below says why
			}
		}
		stream.CloseSend()
	}()
	for {
		response, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := onResponse(response); err != nil {
			return err
		}
	}
}

// generate calls Generate and hands each GenerateResponse to onResponse as it arrives: Text is the new text since the
// previous one, and the last also has FinishReason, Usage and ModelVersion. Returning early (an error from onResponse)
// cancels the call, which stops the generation on the server.
func (c client) generate(request *gatewayv1.GenerateRequest, onResponse func(*gatewayv1.GenerateResponse) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), generateTimeout)
	defer cancel()
	stream, err := c.stub.Generate(ctx, request)
	if err != nil {
		return err
	}
	for {
		response, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := onResponse(response); err != nil {
			return err
		}
	}
}

func embedRequest(model string, texts []string) *gatewayv1.EmbedRequest {
	return &gatewayv1.EmbedRequest{Model: model, Inputs: texts}
}

// generationOptions are the generate command's flags; nil pointers are options not given, left unset in the request so
// that the server's defaults apply.
type generationOptions struct {
	maxNewTokens *int32
	temperature  *float32
	seed         *uint64
	stop         []string
	chat         bool
}

func generateRequest(model, prompt string, options generationOptions) *gatewayv1.GenerateRequest {
	request := &gatewayv1.GenerateRequest{Model: model, Params: &generationv1.GenerationParams{
		MaxNewTokens: options.maxNewTokens, Temperature: options.temperature, Seed: options.seed, Stop: options.stop,
	}}
	if options.chat {
		request.Messages = []*generationv1.ChatMessage{{Role: "user", Content: prompt}}
	} else {
		request.Prompt = prompt
	}
	return request
}

type deltaLine struct {
	Text     string   `json:"text"`
	TokenIDs []string `json:"token_ids"` // strings, as proto3 JSON writes int64 (and the Node.js client prints them)
}

type usageLine struct {
	PromptTokens    int32 `json:"prompt_tokens"`
	GeneratedTokens int32 `json:"generated_tokens"`
	TotalTokens     int32 `json:"total_tokens"`
}

type finishLine struct {
	FinishReason string    `json:"finish_reason"`
	StopSequence *string   `json:"stop_sequence"`
	Usage        usageLine `json:"usage"`
	Model        string    `json:"model"`
	ModelVersion string    `json:"model_version"`
}

// showGeneration streams a generation: one line per delta as it arrives, then why it ended and the token counts.
// os.Stdout is unbuffered, so each line is written (and readable by a pipe) as soon as its message arrives.
func showGeneration(c client, request *gatewayv1.GenerateRequest) error {
	var last *gatewayv1.GenerateResponse
	err := c.generate(request, func(r *gatewayv1.GenerateResponse) error {
		ids := make([]string, len(r.GetTokenIds()))
		for i, id := range r.GetTokenIds() {
			ids[i] = strconv.FormatInt(id, 10)
		}
		printJSON(os.Stdout, deltaLine{Text: r.GetText(), TokenIDs: ids})
		last = r
		return nil
	})
	if err != nil {
		return err
	}
	if last == nil || last.GetFinishReason() == generationv1.FinishReason_FINISH_REASON_UNSPECIFIED {
		return fmt.Errorf("the Generate stream ended without its last message")
	}
	var stopSequence *string
	if s := last.GetStopSequence(); s != "" {
		stopSequence = &s
	}
	usage := last.GetUsage()
	printJSON(os.Stdout, finishLine{
		// FINISH_REASON_STOP_SEQUENCE -> stop_sequence, as the other clients print it
		FinishReason: strings.ToLower(strings.TrimPrefix(last.GetFinishReason().String(), "FINISH_REASON_")),
		StopSequence: stopSequence,
		Usage: usageLine{
			PromptTokens: usage.GetPromptTokens(), GeneratedTokens: usage.GetGeneratedTokens(), TotalTokens: usage.GetTotalTokens(),
		},
		Model:        last.GetModel(),
		ModelVersion: last.GetModelVersion(),
	})
	return nil
}

type streamErrorLine struct {
	Case            string              `json:"case"`
	ID              string              `json:"id"`
	Code            int32               `json:"code"`
	CodeName        string              `json:"code_name"`
	Message         string              `json:"message"`
	Reason          string              `json:"reason"`
	FieldViolations []map[string]string `json:"field_violations"`
}

// showErrors shows the two ways a Tandem error reaches a caller: a failed unary call, and a failed request inside a
// stream.
func showErrors(c client, model string) error {
	cases := []struct {
		name    string
		request *gatewayv1.EmbedRequest
	}{
		{"empty inputs", embedRequest(model, nil)},
		{"unknown model", embedRequest("no-such-model", []string{"hello"})},
	}
	for _, tc := range cases {
		if _, err := c.embed(tc.request); err == nil {
			return fmt.Errorf("%s: the call succeeded, expected an error", tc.name)
		} else {
			described := describeError(err)
			described.Case = tc.name
			printJSON(os.Stdout, described)
		}
	}
	// A stream reports a failed request in that request's response (StreamError) and goes on with the rest.
	requests := []*gatewayv1.EmbedStreamRequest{
		{Id: "ok", Request: embedRequest(model, []string{"fine"})},
		{Id: "bad", Request: embedRequest(model, nil)},
	}
	return c.embedStream(requests, func(r *gatewayv1.EmbedStreamResponse) error {
		e := r.GetError()
		if e == nil {
			return nil
		}
		fields := []map[string]string{}
		for _, field := range e.GetFields() {
			fields = append(fields, map[string]string{"field": field})
		}
		printJSON(os.Stdout, streamErrorLine{
			Case: "stream request with empty inputs", ID: r.GetId(), Code: e.GetCode(), CodeName: codeName(e.GetCode()),
			Message: e.GetMessage(), Reason: e.GetReason(), FieldViolations: fields,
		})
		return nil
	})
}

// run returns the exit status: 0, 1 when a call fails (its decoded error on stderr), 2 for a bad command line.
func run(args []string) int {
	target, model, command := "127.0.0.1:50051", "", ""
	var topK int32
	var generation generationOptions
	var texts []string
	badNumber := func(option string, err error) int {
		fmt.Fprintf(os.Stderr, "%s: %v\n\n%s", option, err, usage)
		return 2
	}
	// Options may come before or after the command, as in the C++ client.
	for i := 0; i < len(args); i++ {
		arg, hasValue := args[i], i+1 < len(args)
		switch {
		case arg == "--target" && hasValue:
			i++
			target = args[i]
		case arg == "--model" && hasValue:
			i++
			model = args[i]
		case arg == "--top-k" && hasValue:
			i++
			n, err := strconv.ParseInt(args[i], 10, 32)
			if err != nil {
				return badNumber(arg, err)
			}
			topK = int32(n)
		case arg == "--max-new-tokens" && hasValue:
			i++
			n, err := strconv.ParseInt(args[i], 10, 32)
			if err != nil {
				return badNumber(arg, err)
			}
			maxNewTokens := int32(n)
			generation.maxNewTokens = &maxNewTokens
		case arg == "--temperature" && hasValue:
			i++
			t, err := strconv.ParseFloat(args[i], 32)
			if err != nil {
				return badNumber(arg, err)
			}
			temperature := float32(t)
			generation.temperature = &temperature
		case arg == "--seed" && hasValue:
			i++
			seed, err := strconv.ParseUint(args[i], 10, 64)
			if err != nil {
				return badNumber(arg, err)
			}
			generation.seed = &seed
		case arg == "--stop" && hasValue:
			i++
			generation.stop = append(generation.stop, args[i])
		case arg == "--chat":
			generation.chat = true
		case arg == "-h" || arg == "--help":
			fmt.Print(usage)
			return 0
		case command == "":
			command = arg
		default:
			texts = append(texts, arg)
		}
	}
	if command == "" {
		fmt.Fprint(os.Stderr, usage)
		return 2
	}

	// Dial connects lazily: an unreachable target shows up as UNAVAILABLE on the first call.
	conn, err := grpc.Dial(target, grpc.WithInsecure(), grpc.WithDefaultCallOptions(
		grpc.MaxCallRecvMsgSize(maxMessageBytes), grpc.MaxCallSendMsgSize(maxMessageBytes)))
	if err != nil {
		fmt.Fprintf(os.Stderr, "tandem_client: %v\n", err)
		return 1
	}
	defer conn.Close()
	c := client{stub: gatewayv1.NewGatewayServiceClient(conn)}

	switch command {
	case "embed":
		var response *gatewayv1.EmbedResponse
		if response, err = c.embed(embedRequest(model, texts)); err == nil {
			err = printMessage(response)
		}
	case "classify":
		var response *gatewayv1.ClassifyResponse
		request := &gatewayv1.ClassifyRequest{Model: model, Inputs: texts, TopK: topK}
		if response, err = c.classify(request); err == nil {
			err = printMessage(response)
		}
	case "stream":
		requests := make([]*gatewayv1.EmbedStreamRequest, len(texts))
		for i, text := range texts {
			requests[i] = &gatewayv1.EmbedStreamRequest{Id: "r" + strconv.Itoa(i), Request: embedRequest(model, []string{text})}
		}
		err = c.embedStream(requests, func(r *gatewayv1.EmbedStreamResponse) error { return printMessage(r) })
	case "models":
		var response *gatewayv1.ListModelsResponse
		if response, err = c.listModels(); err == nil {
			err = printMessage(response)
		}
	case "generate":
		if len(texts) != 1 {
			fmt.Fprintf(os.Stderr, "generate takes one PROMPT (quote it)\n\n%s", usage)
			return 2
		}
		err = showGeneration(c, generateRequest(model, texts[0], generation))
	case "errors":
		err = showErrors(c, model)
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n\n%s", command, usage)
		return 2
	}
	if err != nil {
		if _, isStatus := status.FromError(err); isStatus {
			printJSON(os.Stderr, describeError(err))
		} else {
			fmt.Fprintf(os.Stderr, "tandem_client: %s\n", strings.TrimSpace(err.Error()))
		}
		return 1
	}
	return 0
}

func main() {
	os.Exit(run(os.Args[1:]))
}
