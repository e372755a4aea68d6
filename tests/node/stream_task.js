#!/usr/bin/env node
// A taskring client in Node.js, as another team would write one: @grpc/grpc-js with the
// .proto files of protos/ loaded at run time by @grpc/proto-loader (no generated code).
// It submits a chat task, then follows the task's Stream until the terminal state.
//
//   node tests/node/stream_task.js [HOST:PORT] [MESSAGE]
//
// HOST:PORT defaults to $TASKRING_TARGET, then 127.0.0.1:50051. On success it prints one
// JSON line {"task_id", "state", "text", "events", "deltas"} and exits 0; otherwise it says
// why on stderr and exits 1 (2 for bad arguments). Every call has a deadline, and a watchdog
// ends the process if the whole run takes longer than RUN_TIMEOUT_MS.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "protos");
const CONNECT_TIMEOUT_MS = 5_000;
const SUBMIT_TIMEOUT_MS = 5_000;
const STREAM_TIMEOUT_MS = 20_000;
const RUN_TIMEOUT_MS = 30_000;
const TERMINAL = new Set(["TASK_STATE_SUCCEEDED", "TASK_STATE_FAILED", "TASK_STATE_CANCELLED"]);

class CheckError extends Error {}

function loadTaskService() {
  const definition = protoLoader.loadSync("taskring/v1/tasks.proto", {
    includeDirs: [PROTO_ROOT],
    // Field names as in the .proto (task_id, output_delta), enum values by name, int64 as
    // decimal strings (a JS number would round past 2^53), and `event` naming the oneof
    // member that is set.
    keepCase: true,
    enums: String,
    longs: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).taskring.v1.TaskService;
}

function deadline(ms) {
  return new Date(Date.now() + ms);
}

function describe(error) {
  // A ServiceError carries the gRPC status; name it as grpcurl and the Python client do.
  if (typeof error.code === "number") {
    const name = Object.keys(grpc.status).find((key) => grpc.status[key] === error.code);
    return `${name ?? error.code}: ${error.details || error.message}`;
  }
  return error.message;
}

function waitForReady(client, address) {
  return new Promise((resolve, reject) => {
    client.waitForReady(deadline(CONNECT_TIMEOUT_MS), (error) => {
      if (error) {
        reject(new CheckError(`cannot connect to ${address}: ${error.message}`));
      } else {
        resolve();
      }
    });
  });
}

function submit(client, message) {
  const request = {
    task: { chat: { model: "local-echo", messages: [{ role: "user", content: message }] } },
  };
  return new Promise((resolve, reject) => {
    client.Submit(request, { deadline: deadline(SUBMIT_TIMEOUT_MS) }, (error, response) => {
      if (error) {
        reject(new CheckError(`Submit failed: ${describe(error)}`));
      } else {
        resolve(response);
      }
    });
  });
}

// Follows one task's Stream to its end. The text is the snapshot's text so far (the watch
// may start after the first tokens went out) plus every output delta, as any watcher
// assembles it; sequence numbers must increase, and the stream must end on a terminal state.
function watch(client, taskId) {
  return new Promise((resolve, reject) => {
    const call = client.Stream({ task_id: taskId }, { deadline: deadline(STREAM_TIMEOUT_MS) });
    const seen = { state: "", text: "", final: null, events: 0, deltas: 0, sequence: -1n };
    const fail = (problem) => {
      call.cancel();
      reject(new CheckError(problem));
    };
    call.on("data", (event) => {
      seen.events += 1;
      const sequence = BigInt(event.sequence);
      if (sequence <= seen.sequence) {
        fail(`sequence went from ${seen.sequence} to ${sequence}`);
        return;
      }
      seen.sequence = sequence;
      if (event.event === "snapshot") {
        seen.state = event.snapshot.state;
        seen.text = event.snapshot.output?.chat?.text ?? "";
        seen.final = event.snapshot;
      } else if (event.event === "state_changed") {
        seen.state = event.state_changed.task.state;
        seen.final = event.state_changed.task;
      } else if (event.event === "output_delta") {
        seen.text += event.output_delta.text;
        seen.deltas += 1;
      } else {
        fail(`event ${sequence} has no known member: ${JSON.stringify(event)}`);
      }
    });
    call.on("error", (error) => reject(new CheckError(`Stream failed: ${describe(error)}`)));
    call.on("end", () => resolve(seen));
  });
}

async function run(address, message) {
  const TaskService = loadTaskService();
  const client = new TaskService(address, grpc.credentials.createInsecure());
  try {
    await waitForReady(client, address);
    const submitted = await submit(client, message);
    const taskId = submitted.task.id;
    if (!taskId) {
      throw new CheckError(`Submit returned no task id: ${JSON.stringify(submitted)}`);
    }
    const seen = await watch(client, taskId);
    if (!TERMINAL.has(seen.state)) {
      throw new CheckError(`Stream of ${taskId} ended in ${seen.state || "no state"}`);
    }
    if (seen.state !== "TASK_STATE_SUCCEEDED") {
      const error = seen.final?.error;
      throw new CheckError(`task ${taskId} ended ${seen.state}: ${error?.code} ${error?.message}`);
    }
    const finalText = seen.final?.output?.chat?.text ?? "";
    if (!seen.text) {
      throw new CheckError(`task ${taskId} SUCCEEDED but the stream carried no output text`);
    }
    if (finalText !== seen.text) {
      throw new CheckError(
        `streamed text ${JSON.stringify(seen.text)} differs from the final output ` +
          JSON.stringify(finalText),
      );
    }
    return {
      task_id: taskId,
      state: seen.state,
      text: seen.text,
      events: seen.events,
      deltas: seen.deltas,
    };
  } finally {
    client.close();
  }
}

function main() {
  const [addressArg, messageArg, ...rest] = process.argv.slice(2);
  if (rest.length > 0 || addressArg === "-h" || addressArg === "--help") {
    process.stderr.write("usage: node stream_task.js [HOST:PORT] [MESSAGE]\n");
    process.exitCode = 2;
    return;
  }
  const address = addressArg || process.env.TASKRING_TARGET || "127.0.0.1:50051";
  const message = messageArg || "Hello from Node.js";
  // unref: the watchdog alone never keeps the process alive once the run is over.
  const watchdog = setTimeout(() => {
    process.stderr.write(`stream_task: no result from ${address} within ${RUN_TIMEOUT_MS} ms\n`);
    process.exit(1);
  }, RUN_TIMEOUT_MS).unref();
  run(address, message).then(
    (result) => {
      clearTimeout(watchdog);
      process.stdout.write(`${JSON.stringify(result)}\n`);
      process.exitCode = 0;
    },
    (error) => {
      clearTimeout(watchdog);
      // A CheckError is a finding about the server; anything else is a bug here: show its stack.
      const text = error instanceof CheckError ? error.message : error.stack;
      process.stderr.write(`stream_task: ${text}\n`);
      process.exitCode = 1;
    },
  );
}

main();
