// A taskring client written against the TypeScript that buf.gen.yaml generates (ts-proto,
// outputServices=grpc-js), as a client team would use it. tests/e2e/test_buf_generate.py
// copies this file beside freshly generated code, compiles both with `tsc --strict` and
// runs the result against a real server: a generator or option change that breaks the
// client's API or its wire format fails there, not in a client team's build.
//
//   node generated_client.js HOST:PORT MESSAGE
//
// Submits a local-echo chat task, follows its Stream to the end and prints one JSON line
// {"task_id", "state", "text"}; exits 0 when the task SUCCEEDED with that text, else 1.
import { credentials, Metadata, type ServiceError } from "@grpc/grpc-js";

import {
  StreamRequest,
  type StreamResponse,
  SubmitRequest,
  type Task,
  TaskServiceClient,
  TaskState,
  taskStateToJSON,
} from "./taskring/v1/tasks";

const CALL_TIMEOUT_MS = 5_000;
const STREAM_TIMEOUT_MS = 20_000;

interface Watched {
  text: string;
  final: Task | undefined;
}

function deadline(ms: number): Date {
  return new Date(Date.now() + ms);
}

function connect(client: TaskServiceClient): Promise<void> {
  return new Promise((resolve, reject) => {
    client.waitForReady(deadline(CALL_TIMEOUT_MS), (error) => (error ? reject(error) : resolve()));
  });
}

function submit(client: TaskServiceClient, message: string): Promise<Task> {
  const request = SubmitRequest.fromPartial({
    task: { chat: { model: "local-echo", messages: [{ role: "user", content: message }] } },
  });
  return new Promise((resolve, reject) => {
    client.submit(
      request,
      new Metadata(),
      { deadline: deadline(CALL_TIMEOUT_MS) },
      (error: ServiceError | null, response) => {
        if (error) {
          reject(error);
        } else if (!response.task) {
          reject(new Error("Submit returned no task"));
        } else {
          resolve(response.task);
        }
      },
    );
  });
}

// The snapshot's text so far, then every delta; the last task seen is the final one.
function watch(client: TaskServiceClient, taskId: string): Promise<Watched> {
  const call = client.stream(StreamRequest.fromPartial({ taskId }), {
    deadline: deadline(STREAM_TIMEOUT_MS),
  });
  const watched: Watched = { text: "", final: undefined };
  return new Promise((resolve, reject) => {
    call.on("data", (response: StreamResponse) => {
      if (response.snapshot) {
        watched.text = response.snapshot.output?.chat?.text ?? "";
        watched.final = response.snapshot;
      } else if (response.stateChanged?.task) {
        watched.final = response.stateChanged.task;
      } else if (response.outputDelta) {
        watched.text += response.outputDelta.text;
      }
    });
    call.on("error", reject);
    call.on("end", () => resolve(watched));
  });
}

async function main(): Promise<number> {
  const [address, message] = process.argv.slice(2);
  if (!address || !message) {
    process.stderr.write("usage: node generated_client.js HOST:PORT MESSAGE\n");
    return 2;
  }
  const client = new TaskServiceClient(address, credentials.createInsecure());
  try {
    await connect(client);
    const task = await submit(client, message);
    const watched = await watch(client, task.id);
    const state = watched.final?.state ?? TaskState.TASK_STATE_UNSPECIFIED;
    const finalText = watched.final?.output?.chat?.text ?? "";
    const printed = { task_id: task.id, state: taskStateToJSON(state), text: watched.text };
    process.stdout.write(`${JSON.stringify(printed)}\n`);
    const succeeded = state === TaskState.TASK_STATE_SUCCEEDED;
    if (!succeeded || !watched.text || watched.text !== finalText) {
      const error = watched.final?.error;
      process.stderr.write(
        `generated_client: task ended ${printed.state} (${error?.code ?? "no error"}); ` +
          `streamed ${JSON.stringify(watched.text)}, final output ${JSON.stringify(finalText)}\n`,
      );
      return 1;
    }
    return 0;
  } finally {
    client.close();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    const text = error instanceof Error ? error.message : String(error);
    process.stderr.write(`generated_client: ${text}\n`);
    process.exitCode = 1;
  },
);
