/**
 * The evaluator: runs a compiled pack's rules for one hook call under a time budget.
 *
 * fhirpath.js is synchronous, so a pathological expression cannot be interrupted in the
 * thread running it. Evaluation therefore happens in a small pool of worker threads. A worker
 * evaluates rule by rule and posts each outcome as it completes; the main thread keeps a
 * per-rule and a per-call deadline. When one passes, it terminates the worker (the pool
 * replaces it), marks the rule that was running `timeout`, and continues the remaining rules
 * in another worker while the call budget lasts; rules left when it runs out are `skipped`.
 *
 * With `inlineSliceMs`, a pack whose every expression is on the fast path is first run in the
 * calling thread under a time slice (`runGuarded`: no fhirpath.js there, the clock read as the
 * fast path works); a call that cannot finish that way goes to a worker from the start.
 * See rules/README.md.
 */
import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { Worker } from 'node:worker_threads';
import type { PackProgram } from './compile-pack.ts';
import {
  cachedProgram,
  LruCache,
  programFor,
  programInSlices,
  programsCompilingInSlices,
} from './compile-pack.ts';
import { runRules } from './evaluate-core.ts';
import { runGuarded } from './fast-path.ts';
import type {
  Progress,
  RunMessage,
  SerializedInput,
  WarmMessage,
  WorkerMessage,
} from './evaluator-protocol.ts';
import {
  epochMs,
  PHASE_IDLE,
  PHASE_LET,
  PHASE_RULE,
  PROGRESS_BYTES,
  progressView,
  readProgress,
} from './evaluator-protocol.ts';
import { UnknownServiceError } from './errors.ts';
import type {
  CompiledPack,
  EvaluationInput,
  EvaluationResult,
  LetTraceEntry,
  RawCard,
  TraceEntry,
} from './types.ts';

/** Evaluates packs for hook calls. */
export interface Evaluator {
  /**
   * Evaluates the rules of `serviceId` over one call's input. Rule failures, timeouts and an
   * exhausted budget show in the trace; the promise itself does not reject for them.
   * @throws UnknownServiceError if the pack has no such service; Error if the evaluator is closed.
   */
  evaluate(
    pack: CompiledPack,
    serviceId: string,
    input: EvaluationInput,
    opts?: EvaluateOptions,
  ): Promise<EvaluationResult>;
  /**
   * Resolves once every worker (and the spare) has started, e.g. before serving traffic.
   * @throws Error if workers keep failing to start.
   */
  ready(): Promise<void>;
  /**
   * Compiles `pack` ahead in the spare and every started worker, without evaluating anything
   * (e.g. right after an upload or a subscription change), so that its first calls do not pay
   * the compilation out of their budget. In the background, one worker at a time (the spare
   * first): a serving worker compiling it takes no call meanwhile (it counts as busy), so calls
   * go to the others and never wait behind a compilation while another worker is free.
   */
  warm(pack: CompiledPack): void;
  /** Stops the workers. Calls in flight finish with their remaining rules `skipped`. */
  close(): Promise<void>;
  /** Counters for metrics and tests. */
  stats(): EvaluatorStats;
  /**
   * The budgets this evaluator applies (as created), e.g. so that an upload's tests can hold a
   * pack to the live evaluator's budgets.
   */
  budgets(): EvaluatorBudgets;
}

/** The time budgets of an evaluator (ms). */
export interface EvaluatorBudgets {
  /** Budget of one call, from `evaluate()` to its result. */
  callBudgetMs: number;
  /** Budget of one rule (and of one `let`). */
  ruleBudgetMs: number;
}

export interface EvaluateOptions {
  /**
   * `JSON.stringify({ context: input.context, prefetch: input.prefetch })`, when the caller has
   * it already (the hook path serializes it once, for the worker and for the invocation
   * record). Must be exactly that text.
   */
  inputJson?: string;
  /**
   * Who the call is for (the hook path passes the tenant id). How a pack fares in the calling
   * thread (its tries, hand-offs and pause) is kept per scope and pack, so one tenant whose
   * inputs keep handing off pauses the main-thread runs of its own calls only.
   */
  scope?: string;
  /**
   * Author tools only (`pack eval --trace`, a failing `pack test`, the playground), never the
   * live hook path: each let in `lets` gets a summary of its value (patient data) and each
   * not-fired rule the first top-level `and`-operand of its `when` that came out empty or
   * false (see rules/trace-values.ts). The call then always runs in a worker.
   */
  traceValues?: boolean;
}

export interface EvaluatorStats {
  /** Worker threads started so far (replacements included). */
  workersStarted: number;
  /** Workers terminated because a rule overran its budget or the worker failed. */
  workersReplaced: number;
  /**
   * Workers that exited on their own (crashed, ran out of heap, failed to start), not stopped
   * by the pool or by `close()`. One that died during a call is in `workersReplaced` too.
   */
  workersCrashed?: number;
  /** Workers serving calls (the pool's size; the spare not counted). */
  workers?: number;
  /** Of those, the ones running a call now. */
  busyWorkers?: number;
  /** Calls waiting for a free worker now. */
  queuedCalls?: number;
  /** Calls evaluated. */
  calls: number;
  /** Calls evaluated in the calling thread under a time slice (`inlineSliceMs`). */
  inline?: number;
  /** Calls whose guarded run in the calling thread handed them to a worker. */
  handedOff?: number;
  /**
   * Packs whose compilation in a worker outlasted a call (the worker was stopped before it
   * began the call's rules): they are no longer compiled ahead in spare or idle workers.
   */
  compileOverruns?: number;
  /**
   * Packs a call found not compiled in the calling thread (the call went to a worker) and that
   * were then compiled there in slices, off the calls' path, for the calls after it.
   */
  compiledAside?: number;
  /** Workers (the spare included) compiling a pack ahead now (`warm`): 0 or 1. */
  warmingWorkers?: number;
  /** Packs still to be compiled ahead in a worker that lacks them (`warm`). */
  warmsPending?: number;
  /** Compilations ahead done in workers so far (one per worker and pack). */
  warmed?: number;
}

/** Worker -> main: a `warm` is done (compiled, or it does not compile: reported when run). */
export interface WarmedMessage {
  type: 'warmed';
  hash: string;
}

export interface EvaluatorOptions {
  /** Wall-clock budget of one call, from `evaluate()` to its result. Default 2000. */
  callBudgetMs?: number;
  /** Budget of one rule (and of one `let`). Default 500. */
  ruleBudgetMs?: number;
  /**
   * Worker threads. Default min(2, availableParallelism()). 0 = evaluate in the calling
   * thread: no preemption (a rule cannot be interrupted), only the call budget between rules;
   * meant for tools and trusted packs.
   */
  workers?: number;
  /** Heap limit of a worker (MB); a rule that exhausts it fails like a crashed worker. Default 512. */
  workerMemoryMb?: number;
  /**
   * With workers: a call of a pack whose every expression is on the fast path is first
   * evaluated in the calling thread, under a slice of this many ms (the fast path reads the
   * clock as it works and gives up past it; it never runs fhirpath.js there). A call that
   * cannot finish that way (slice used up, an expression needing fhirpath.js at run time) is
   * evaluated from the start in a worker, under the budgets above. 0 = always in a worker.
   * Default 0.
   */
  inlineSliceMs?: number;
  /**
   * A pack whose calls keep handing off is not tried in the calling thread for this long (ms),
   * then tried again afresh. Default 60,000.
   */
  inlineRetryMs?: number;
}

/** At most this many packs wait to be compiled ahead in the workers (the oldest is dropped). */
const MAX_WARMS_PENDING = 64;

/** At most this many packs compile in slices in the calling thread at once (compileAside). */
const MAX_COMPILES_ASIDE = 2;

/** A pack stops being tried in the calling thread after this many hand-offs... */
const INLINE_MIN_HANDOFFS = 10;
/** ...if they are more than this share of its tries. */
const INLINE_MAX_HANDOFF_SHARE = 0.05;

/** How one pack fares in the calling thread. */
interface InlineRecord {
  /** Its program, or null: never in the calling thread (not all on the fast path, or no compile). */
  program: PackProgram | null;
  tries: number;
  handOffs: number;
  /** performance.now() before which it is not tried (it handed off too often). */
  pausedUntil: number;
}

const WORKER_URL = new URL('./evaluator-worker.ts', import.meta.url);

/**
 * The file URL an ESM `import` of a package subpath resolves to. `import.meta.resolve` when
 * available; when tsx has loaded this module as CommonJS it is missing, and `require.resolve`
 * would pick the package's `require` build, so the `import` condition is read from the
 * package's `exports`.
 */
function resolveImport(pkg: string, subpath: string): string {
  const meta = import.meta as { resolve?: (specifier: string) => string };
  if (typeof meta.resolve === 'function') {
    return meta.resolve(`${pkg}/${subpath}`);
  }
  const pkgJson = createRequire(import.meta.url).resolve(`${pkg}/package.json`);
  const exportsMap = (
    JSON.parse(readFileSync(pkgJson, 'utf8')) as { exports?: Record<string, unknown> }
  ).exports;
  let entry: unknown = exportsMap?.[`./${subpath}`];
  while (typeof entry === 'object' && entry !== null) {
    const e = entry as Record<string, unknown>;
    entry = e.import ?? e.default;
  }
  if (typeof entry !== 'string') {
    throw new Error(`cannot resolve ${pkg}/${subpath}`);
  }
  return pathToFileURL(path.join(path.dirname(pkgJson), entry)).href;
}

/**
 * The code a worker thread starts with. Under tsx (no build step) the worker module is a
 * `.ts` file, and on Node 20 a worker's entry module is loaded before the `--import tsx`
 * hooks it inherits are active, so a `.ts` entry fails with ERR_UNKNOWN_FILE_EXTENSION. The
 * worker therefore starts from this small script, which registers tsx's ESM hooks in the
 * worker (`tsx/esm/api`) and then imports the `.ts` module. A `.js` worker is imported directly.
 */
export function workerBootstrapCode(workerUrl: URL = WORKER_URL): string {
  const target = JSON.stringify(workerUrl.href);
  if (!workerUrl.pathname.endsWith('.ts')) {
    return `import(${target});`;
  }
  const tsxApi = JSON.stringify(resolveImport('tsx', 'esm/api'));
  return `import(${tsxApi}).then((tsx) => { tsx.register(); return import(${target}); });`;
}

interface Slot {
  worker: Worker;
  /** What the worker is running (shared memory it writes; see evaluator-protocol.ts). */
  progress: Progress;
  ready: boolean;
  /**
   * It started (posted `ready`) once: its exit is not a failed start, even after forget()
   * cleared `ready` (a worker replaced for overrunning a budget).
   */
  started?: boolean;
  /** Pack hashes this worker has been sent. */
  hashes: Set<string>;
  /** The pack this worker is compiling ahead (`warm`): it takes no call until it is done. */
  warming?: string;
  onMessage?: (msg: WorkerMessage) => void;
  onExit?: () => void;
}

interface Waiter {
  resolve: (slot: Slot | undefined) => void;
  timer: NodeJS.Timeout;
}

/**
 * `size` workers serve calls; one more, the spare, is kept started and idle so that a worker
 * terminated for overrunning its budget is replaced at once (starting a worker with tsx takes
 * a few hundred milliseconds, which would otherwise come out of the interrupted call's budget).
 */
class WorkerPool {
  private readonly active = new Set<Slot>();
  private spare: Slot | undefined;
  private readonly idle: Slot[] = [];
  private readonly waiters: Waiter[] = [];
  private closed = false;
  private failedStarts = 0;
  private retryTimer: NodeJS.Timeout | undefined;
  private readyWaiters: Array<{ resolve: () => void; reject: (err: Error) => void }> = [];
  /** Packs used lately, compiled ahead in each new spare. */
  private readonly recent = new Map<string, CompiledPack>();
  /**
   * Packs whose compilation outlasted a call: never compiled ahead, so that no spare (which
   * takes over from a stopped worker) or idle worker is kept busy compiling one.
   */
  private readonly slowCompiles = new LruCache<true>(256);
  /**
   * Packs to compile ahead, oldest first: in the spare, and (`all`) in every serving worker
   * that lacks them. A pack leaves once no ready worker lacks it (see pumpWarm).
   */
  private readonly warmQueue = new Map<string, { pack: CompiledPack; all: boolean }>();
  /** The worker compiling a pack ahead now: one at a time. */
  private warmingSlot: Slot | undefined;
  started = 0;
  replaced = 0;
  crashed = 0;
  compileOverruns = 0;
  warmed = 0;

  constructor(
    private readonly size: number,
    private readonly memoryMb: number,
  ) {
    this.maintain();
  }

  /** Brings the pool back to `size` active workers plus a spare. */
  private maintain(): void {
    if (this.closed) {
      return;
    }
    while (this.active.size < this.size) {
      const spare = this.spare;
      if (spare) {
        this.spare = undefined;
        this.active.add(spare);
        this.offer(spare);
      } else if (!this.spawnLater()) {
        this.active.add(this.spawn());
      } else {
        return;
      }
    }
    if (!this.spare && !this.spawnLater()) {
      this.spare = this.spawn();
    }
    this.checkReady();
  }

  /** After workers failed to start, new ones are started with a backoff, not in a hot loop. */
  private spawnLater(): boolean {
    if (this.failedStarts === 0) {
      return false;
    }
    if (!this.retryTimer) {
      this.retryTimer = setTimeout(
        () => {
          this.retryTimer = undefined;
          const failed = this.failedStarts;
          this.failedStarts = 0;
          this.maintain();
          this.failedStarts = failed;
        },
        Math.min(5000, 250 * 2 ** this.failedStarts),
      );
      this.retryTimer.unref();
    }
    return true;
  }

  private spawn(): Slot {
    const shared = new SharedArrayBuffer(PROGRESS_BYTES);
    const worker = new Worker(workerBootstrapCode(), {
      eval: true,
      workerData: { progress: shared },
      resourceLimits: { maxOldGenerationSizeMb: this.memoryMb },
    });
    worker.unref();
    this.started++;
    const slot: Slot = { worker, progress: progressView(shared), ready: false, hashes: new Set() };
    worker.on('message', (msg: WorkerMessage | WarmedMessage) => {
      if (msg.type === 'ready') {
        slot.ready = true;
        slot.started = true;
        this.failedStarts = 0;
        if (this.spare === slot) {
          for (const p of this.recent.values()) {
            this.queueWarm(p, false);
          }
        }
        this.offer(slot);
        this.checkReady();
        return;
      }
      if (msg.type === 'warmed') {
        this.warmDone(slot);
        return;
      }
      slot.onMessage?.(msg);
    });
    // Errors surface through 'exit'; without a listener an uncaught worker error would throw here.
    worker.on('error', () => undefined);
    worker.on('exit', () => {
      // A worker that once started is no failed start, whether it crashed or was replaced.
      const wasReady = slot.started === true;
      // Still in the pool: it was not stopped by discard() (which forgets it first) or close().
      if (!this.closed && (this.active.has(slot) || this.spare === slot)) {
        this.crashed++;
      }
      if (slot.warming !== undefined && !this.closed) {
        // It died compiling a pack ahead (out of memory, say): never warm that pack again, or
        // each new worker would crash on it in turn.
        this.noteSlowCompile(slot.warming);
      }
      this.forget(slot);
      slot.onExit?.();
      this.pumpWarm();
      if (!wasReady && !this.closed) {
        this.failedStarts++;
        if (this.failedStarts >= 3) {
          for (const w of this.readyWaiters.splice(0)) {
            w.reject(new Error('evaluation workers fail to start'));
          }
        }
      }
      this.maintain();
    });
    return slot;
  }

  /** Queues `pack` to be compiled ahead in the spare and (`all`) in every serving worker. */
  private queueWarm(pack: CompiledPack, all: boolean): void {
    if (this.closed || this.slowCompiles.get(pack.hash) !== undefined) {
      return;
    }
    const queued = this.warmQueue.get(pack.hash);
    this.warmQueue.set(pack.hash, { pack, all: all || queued?.all === true });
    while (this.warmQueue.size > MAX_WARMS_PENDING) {
      const oldest = this.warmQueue.keys().next();
      if (oldest.done === true) {
        break;
      }
      this.warmQueue.delete(oldest.value);
    }
    this.pumpWarm();
  }

  /**
   * Starts the next compilation ahead, unless one is running (one worker at a time): in the
   * spare if it lacks the pack (it serves no call), else in an idle serving worker that lacks
   * it, taken out of `idle` until it is done (so it counts as busy and calls go to the others).
   * A worker running a call is warmed once it is idle with no call waiting (offer() calls this
   * again), and only while another ready serving worker is left for the calls (unless the pool
   * has a single worker).
   */
  private pumpWarm(): void {
    if (this.closed || this.warmingSlot) {
      return;
    }
    for (const [hash, { pack, all }] of this.warmQueue) {
      if (this.slowCompiles.get(hash) !== undefined) {
        this.warmQueue.delete(hash);
        continue;
      }
      const lacks = (s: Slot | undefined): s is Slot =>
        s !== undefined && s.ready && !s.hashes.has(hash);
      const spare = this.spare;
      if (lacks(spare)) {
        this.startWarm(spare, pack);
        return;
      }
      const serving = all ? [...this.active].filter(lacks) : [];
      if (serving.length === 0) {
        // A worker still starting that lacks it (a replacement, the spare moved into service
        // before it was ready) gets it once ready (offer() pumps again): keep it queued.
        const starting = (s: Slot | undefined) =>
          s !== undefined && !s.ready && !s.hashes.has(hash);
        if (!starting(spare) && !(all && [...this.active].some(starting))) {
          this.warmQueue.delete(hash);
        }
        continue;
      }
      const slot = this.idle.find((s) => serving.includes(s));
      const othersServe =
        this.size === 1 || [...this.active].some((s) => s !== slot && s.ready && !s.warming);
      if (slot && othersServe) {
        this.idle.splice(this.idle.indexOf(slot), 1);
        this.startWarm(slot, pack);
        return;
      }
      // Its workers are running calls: it waits, and the next pack may find one idle.
    }
  }

  private startWarm(slot: Slot, pack: CompiledPack): void {
    slot.hashes.add(pack.hash);
    slot.warming = pack.hash;
    this.warmingSlot = slot;
    const msg: WarmMessage = { type: 'warm', hash: pack.hash, pack: pack.pack };
    slot.worker.postMessage(msg);
  }

  /** A worker finished compiling a pack ahead: it serves calls again; the next warm starts. */
  private warmDone(slot: Slot): void {
    if (slot.warming === undefined) {
      return;
    }
    slot.warming = undefined;
    if (this.warmingSlot === slot) {
      this.warmingSlot = undefined;
    }
    this.warmed++;
    this.offer(slot);
    this.pumpWarm();
  }

  /** Compiles `pack` ahead in the spare and every started worker (see Evaluator.warm). */
  warmAll(pack: CompiledPack): void {
    this.noteUse(pack);
    this.queueWarm(pack, true);
  }

  /** Workers compiling a pack ahead now (0 or 1) and packs still to be compiled ahead. */
  warming(): { workers: number; pending: number } {
    return { workers: this.warmingSlot ? 1 : 0, pending: this.warmQueue.size };
  }

  /**
   * Notes that a pack's compilation outlasted a call: it is no longer compiled ahead (its
   * compilation counted against that call's budget, as every compilation in a worker does).
   */
  noteSlowCompile(hash: string): void {
    if (this.slowCompiles.get(hash) === undefined) {
      this.compileOverruns++;
    }
    this.slowCompiles.set(hash, true);
    this.recent.delete(hash);
    this.warmQueue.delete(hash);
  }

  /** Notes a pack in use; the spare compiles it ahead so that a takeover does not have to. */
  noteUse(pack: CompiledPack): void {
    if (this.recent.has(pack.hash) || this.slowCompiles.get(pack.hash) !== undefined) {
      return;
    }
    this.recent.set(pack.hash, pack);
    while (this.recent.size > 8) {
      const oldest = this.recent.keys().next();
      if (oldest.done === true) {
        break;
      }
      this.recent.delete(oldest.value);
    }
    if (this.spare?.ready === true) {
      this.queueWarm(pack, false);
    }
  }

  private isReady(): boolean {
    return (
      this.active.size === this.size &&
      [...this.active].every((s) => s.ready) &&
      this.spare?.ready === true
    );
  }

  private checkReady(): void {
    if (this.isReady()) {
      for (const w of this.readyWaiters.splice(0)) {
        w.resolve();
      }
    }
  }

  /** Resolves when all workers and the spare are ready. */
  whenReady(): Promise<void> {
    if (this.closed) {
      return Promise.reject(new Error('evaluator is closed'));
    }
    if (this.isReady()) {
      return Promise.resolve();
    }
    return new Promise((resolve, reject) => {
      this.readyWaiters.push({ resolve, reject });
    });
  }

  private forget(slot: Slot): void {
    slot.ready = false;
    slot.warming = undefined;
    if (this.warmingSlot === slot) {
      this.warmingSlot = undefined;
    }
    this.active.delete(slot);
    if (this.spare === slot) {
      this.spare = undefined;
    }
    const i = this.idle.indexOf(slot);
    if (i >= 0) {
      this.idle.splice(i, 1);
    }
  }

  private offer(slot: Slot): void {
    // A worker compiling a pack ahead is offered once it is done (warmDone).
    if (this.closed || !slot.ready || !this.active.has(slot) || slot.warming !== undefined) {
      return;
    }
    const waiter = this.waiters.shift();
    if (waiter) {
      clearTimeout(waiter.timer);
      waiter.resolve(slot);
    } else {
      this.idle.push(slot);
      this.pumpWarm();
    }
  }

  /** A ready worker, or undefined if none frees up before `deadline` (performance.now()). */
  acquire(deadline: number, urgent: boolean): Promise<Slot | undefined> {
    if (this.closed) {
      return Promise.resolve(undefined);
    }
    const slot = this.idle.shift();
    if (slot) {
      return Promise.resolve(slot);
    }
    return new Promise((resolve) => {
      const waiter: Waiter = {
        resolve,
        timer: setTimeout(
          () => {
            const i = this.waiters.indexOf(waiter);
            if (i >= 0) {
              this.waiters.splice(i, 1);
            }
            resolve(undefined);
          },
          Math.max(0, deadline - performance.now()),
        ),
      };
      // A call continuing after a timeout goes first: it already spent part of its budget.
      if (urgent) {
        this.waiters.unshift(waiter);
      } else {
        this.waiters.push(waiter);
      }
    });
  }

  /** Workers serving calls, the ones running a call now, and calls waiting for one. */
  load(): { workers: number; busy: number; queued: number } {
    let busy = 0;
    for (const slot of this.active) {
      if (slot.ready && !this.idle.includes(slot)) {
        busy++;
      }
    }
    return { workers: this.size, busy, queued: this.waiters.length };
  }

  release(slot: Slot): void {
    slot.onMessage = undefined;
    slot.onExit = undefined;
    this.offer(slot);
  }

  /** Terminates a worker (it overran or misbehaved); the spare takes its place at once. */
  discard(slot: Slot): void {
    slot.onMessage = undefined;
    slot.onExit = undefined;
    this.replaced++;
    this.forget(slot);
    void slot.worker.terminate();
    this.maintain();
    this.pumpWarm();
  }

  async close(): Promise<void> {
    this.closed = true;
    this.warmQueue.clear();
    this.warmingSlot = undefined;
    clearTimeout(this.retryTimer);
    for (const w of this.readyWaiters.splice(0)) {
      w.reject(new Error('evaluator is closed'));
    }
    for (const w of this.waiters.splice(0)) {
      clearTimeout(w.timer);
      w.resolve(undefined);
    }
    const all = [...this.active, ...(this.spare ? [this.spare] : [])];
    for (const s of all) {
      s.onExit?.();
      s.onMessage = undefined;
      s.onExit = undefined;
    }
    await Promise.all(all.map((s) => s.worker.terminate()));
  }
}

/** The outcome of one call, gathered as rules complete (possibly over several workers). */
class CallState {
  readonly results = new Map<string, { entry: TraceEntry; card?: RawCard }>();
  readonly lets: LetTraceEntry[] = [];
  readonly failedLets: Record<string, string> = {};
  attempts = 0;
  /** Author tools: summarize let values (see EvaluateOptions.traceValues). */
  traceValues = false;

  constructor(readonly ruleIds: readonly string[]) {}

  remaining(): string[] {
    return this.ruleIds.filter((id) => !this.results.has(id));
  }

  set(entry: TraceEntry, card?: RawCard): void {
    if (!this.results.has(entry.ruleId)) {
      this.results.set(entry.ruleId, card ? { entry, card } : { entry });
    }
  }

  addLet(entry: LetTraceEntry): void {
    this.lets.push(entry);
    if (entry.status !== 'ok') {
      this.failedLets[entry.name] = entry.error ?? entry.status;
    }
  }

  finish(
    pack: CompiledPack,
    serviceId: string,
    started: number,
    skippedReason: string,
  ): EvaluationResult {
    for (const id of this.remaining()) {
      this.set({
        ruleId: id,
        status: 'skipped',
        fired: false,
        durationMs: 0,
        error: skippedReason,
      });
    }
    const trace: TraceEntry[] = [];
    const cards: RawCard[] = [];
    for (const id of this.ruleIds) {
      const r = this.results.get(id);
      if (r) {
        trace.push(r.entry);
        if (r.card) {
          cards.push(r.card);
        }
      }
    }
    return {
      pack: { id: pack.id, version: pack.version, hash: pack.hash },
      service: serviceId,
      cards,
      trace,
      durationMs: performance.now() - started,
      lets: this.lets,
    };
  }
}

function ruleIdsOf(pack: CompiledPack, serviceId: string): string[] {
  if (!pack.pack.services.some((s) => s.id === serviceId)) {
    throw new UnknownServiceError(serviceId);
  }
  return pack.pack.rules.filter((r) => r.service === serviceId).map((r) => r.id);
}

type AttemptOutcome = 'done' | 'stopped';

let nextCallId = 1;

class PooledEvaluator implements Evaluator {
  private readonly pool: WorkerPool;
  private closed = false;
  private calls = 0;
  private inline = 0;
  private handedOff = 0;
  /**
   * Per scope (tenant) and pack hash: a few numbers each (the program is shared, from the
   * compiled-pack cache). Bounded; a dropped record is made again, afresh.
   */
  private readonly inlinePacks = new LruCache<InlineRecord>(10_000);
  /** Packs (hashes) that failed to compile in this thread: never run here. */
  private readonly uncompilable = new LruCache<true>(256);
  /** Packs compiled in this thread off a call's path (see compileAside). */
  private compiledAside = 0;

  constructor(
    private readonly callBudgetMs: number,
    private readonly ruleBudgetMs: number,
    workers: number,
    memoryMb: number,
    private readonly inlineSliceMs: number,
    private readonly inlineRetryMs: number,
  ) {
    this.pool = new WorkerPool(workers, memoryMb);
  }

  /**
   * The scope's record of the pack in the calling thread (created on first use), or undefined
   * while this thread has not compiled the pack: the call then goes to a worker, and the pack
   * is compiled here in slices, off the call's path (see compileAside).
   */
  private inlineRecord(pack: CompiledPack, scope: string): InlineRecord | undefined {
    const key = `${scope}\u0000${pack.hash}`;
    let rec = this.inlinePacks.get(key);
    if (!rec) {
      let program: PackProgram | null = null;
      if (this.uncompilable.get(pack.hash) === undefined) {
        const p = cachedProgram(pack.hash);
        if (!p) {
          this.compileAside(pack);
          return undefined;
        }
        program = p.allFast ? p : null;
      }
      // Else it does not compile: the worker reports it, rule by rule.
      rec = { program, tries: 0, handOffs: 0, pausedUntil: 0 };
      this.inlinePacks.set(key, rec);
    }
    return rec;
  }

  /**
   * Compiles a pack in this thread in slices (letting the event loop run between them), for
   * the calls after this one. A big pack takes this thread 0.1-0.5 s to compile: in one block,
   * every call in flight would wait that long. A few at a time (more: the calls go to workers
   * meanwhile, and ask again later); a pack that does not compile is not tried again.
   */
  private compileAside(pack: CompiledPack): void {
    if (this.closed || programsCompilingInSlices() >= MAX_COMPILES_ASIDE) {
      return;
    }
    programInSlices(pack.hash, pack.pack).then(
      () => {
        this.compiledAside++;
      },
      () => {
        this.uncompilable.set(pack.hash, true);
      },
    );
  }

  /**
   * Evaluates a call in this thread under the slice, or returns undefined (nothing kept) if it
   * must go to a worker. The rules see the caller's input objects: nothing in a fast-path run
   * writes to them (spec/rules/evaluator.spec.ts checks). Cards are copied, as a worker's are.
   */
  private tryInline(
    pack: CompiledPack,
    serviceId: string,
    input: EvaluationInput,
    ruleIds: readonly string[],
    started: number,
    scope: string,
  ): EvaluationResult | undefined {
    const rec = this.inlineRecord(pack, scope);
    const program = rec?.program;
    if (!rec || !program || started < rec.pausedUntil) {
      return undefined;
    }
    rec.tries++;
    const call = new CallState(ruleIds);
    let result: EvaluationResult;
    try {
      runGuarded(this.inlineSliceMs, () => {
        runInto(call, program, input);
      });
      result = call.finish(pack, serviceId, started, 'call budget exhausted');
      // Copied as a worker's message would copy them (and refused the same way).
      result.cards = structuredClone(result.cards);
    } catch {
      // A HandOff, or anything else thrown here (by the run, or copying a card that a worker
      // could not post either): the worker evaluates the call and has the last word.
      rec.handOffs++;
      this.handedOff++;
      if (
        rec.handOffs >= INLINE_MIN_HANDOFFS &&
        rec.handOffs > rec.tries * INLINE_MAX_HANDOFF_SHARE
      ) {
        // Paused, not dropped, and for this scope only: packs are shared by tenants, and one
        // tenant's odd inputs should not keep any other tenant's calls off the main thread.
        rec.pausedUntil = performance.now() + this.inlineRetryMs;
        rec.tries = 0;
        rec.handOffs = 0;
      }
      return undefined;
    }
    this.inline++;
    return result;
  }

  async evaluate(
    pack: CompiledPack,
    serviceId: string,
    input: EvaluationInput,
    opts: EvaluateOptions = {},
  ): Promise<EvaluationResult> {
    if (this.closed) {
      throw new Error('evaluator is closed');
    }
    const started = performance.now();
    const deadline = started + this.callBudgetMs;
    const call = new CallState(ruleIdsOf(pack, serviceId));
    call.traceValues = opts.traceValues === true;
    this.calls++;
    // A traced call runs fhirpath.js for its summaries: never in this thread's guarded slice.
    if (this.inlineSliceMs > 0 && !call.traceValues) {
      const done = this.tryInline(pack, serviceId, input, call.ruleIds, started, opts.scope ?? '');
      if (done) {
        return done;
      }
    }
    this.pool.noteUse(pack);
    // The input crosses to the worker as JSON text, serialized once per call.
    let serialized: SerializedInput;
    try {
      serialized = {
        hook: input.hook,
        hookInstance: input.hookInstance,
        json:
          opts.inputJson ?? JSON.stringify({ context: input.context, prefetch: input.prefetch }),
        now: input.now.getTime(),
      };
    } catch {
      for (const id of call.ruleIds) {
        call.set({
          ruleId: id,
          status: 'error',
          fired: false,
          durationMs: 0,
          error: 'input cannot be passed to the evaluation worker',
        });
      }
      return call.finish(pack, serviceId, started, 'call budget exhausted');
    }
    let reason = 'call budget exhausted';
    while (call.remaining().length > 0) {
      if (this.isClosed()) {
        reason = 'evaluator closed';
        break;
      }
      // (Timers may fire a little early: a budget within 2 ms of its end is spent.)
      if (performance.now() >= deadline - 2) {
        break;
      }
      const slot = await this.pool.acquire(deadline, call.attempts > 0);
      if (!slot) {
        reason = this.isClosed()
          ? 'evaluator closed'
          : 'no evaluation worker free within the call budget';
        break;
      }
      call.attempts++;
      const outcome = await this.attempt(slot, pack, serialized, call, deadline);
      if (outcome === 'done') {
        this.pool.release(slot);
      } else {
        this.pool.discard(slot);
      }
    }
    return call.finish(pack, serviceId, started, reason);
  }

  /**
   * Runs the remaining rules of a call on one worker until done, a deadline, or a crash. The
   * worker reports outcomes in batches; between them, the progress record says which rule (or
   * let) is running and since when, which is what the rule budget is checked against.
   */
  private attempt(
    slot: Slot,
    pack: CompiledPack,
    input: SerializedInput,
    call: CallState,
    deadline: number,
  ): Promise<AttemptOutcome> {
    const callId = nextCallId++;
    const ruleIds = call.remaining();
    const ruleBudget = this.ruleBudgetMs;
    const deadlineEpoch = performance.timeOrigin + deadline;
    const letNames = Object.keys(pack.pack.let ?? {});
    return new Promise((resolve) => {
      let timer: NodeJS.Timeout | undefined;
      /** This attempt sent the pack: the worker compiles it before the call's first step. */
      let sentPack = false;
      const settle = (outcome: AttemptOutcome) => {
        clearTimeout(timer);
        slot.onMessage = undefined;
        slot.onExit = undefined;
        resolve(outcome);
      };
      const arm = (atEpoch: number) => {
        clearTimeout(timer);
        timer = setTimeout(check, Math.max(0, atEpoch - epochMs()));
      };
      /** At a deadline: the step still running past its budget, or the call's end, stops the worker. */
      const check = () => {
        const now = epochMs();
        const p = readProgress(slot.progress);
        const begun = p.callId === callId && p.phase !== PHASE_IDLE;
        const callOver = now >= deadlineEpoch - 1;
        if (!callOver) {
          if (!begun) {
            // Compiling or parsing: only the call budget applies; look again later.
            arm(Math.min(deadlineEpoch, now + ruleBudget));
            return;
          }
          if (p.phase === PHASE_LET || p.phase === PHASE_RULE) {
            const stepEnd = p.startMs + ruleBudget;
            if (now < stepEnd - 1) {
              arm(Math.min(stepEnd, deadlineEpoch));
              return;
            }
          } else {
            // Done: its last batch is on its way.
            arm(Math.min(deadlineEpoch, now + ruleBudget));
            return;
          }
        }
        const ran = now - p.startMs;
        const rule = begun ? ruleIds[p.ruleIndex] : undefined;
        if (begun && p.phase === PHASE_LET) {
          const name = letNames[p.letIndex] ?? 'unknown';
          call.addLet({
            name,
            status: 'timeout',
            durationMs: ran,
            error: 'exceeded the time budget',
          });
          if (rule !== undefined) {
            call.set({
              ruleId: rule,
              status: 'timeout',
              fired: false,
              durationMs: ran,
              error: `let '${name}' exceeded the time budget`,
            });
          }
        } else if (begun && p.phase === PHASE_RULE && rule !== undefined) {
          call.set({
            ruleId: rule,
            status: 'timeout',
            fired: false,
            durationMs: ran,
            error: callOver
              ? 'call budget exhausted'
              : `exceeded the rule budget of ${ruleBudget} ms`,
          });
        } else if (!begun && sentPack) {
          // Still compiling the pack when the call ran out.
          this.pool.noteSlowCompile(pack.hash);
        }
        settle('stopped');
      };

      slot.onExit = () => {
        const p = readProgress(slot.progress);
        const begun = p.callId === callId && p.phase !== PHASE_IDLE;
        const rule = begun ? ruleIds[p.ruleIndex] : undefined;
        const ran = epochMs() - p.startMs;
        if (begun && p.phase === PHASE_LET) {
          call.addLet({
            name: letNames[p.letIndex] ?? 'unknown',
            status: 'error',
            durationMs: ran,
            error: 'evaluation worker stopped',
          });
        }
        if (begun && (p.phase === PHASE_LET || p.phase === PHASE_RULE) && rule !== undefined) {
          call.set({
            ruleId: rule,
            status: 'error',
            fired: false,
            durationMs: ran,
            error: 'evaluation worker stopped',
          });
        }
        settle('stopped');
      };
      slot.onMessage = (msg) => {
        if (!('callId' in msg) || msg.callId !== callId) {
          return;
        }
        switch (msg.type) {
          case 'need-pack':
            sentPack = true;
            slot.worker.postMessage(this.runMessage(callId, pack, input, ruleIds, call, true));
            return;
          case 'batch':
            for (const entry of msg.lets) {
              call.addLet(entry);
            }
            for (const r of msg.rules) {
              call.set(r.entry, r.card);
            }
            if (msg.end) {
              settle('done');
            }
            return;
          case 'failed':
            for (const id of call.remaining()) {
              call.set({
                ruleId: id,
                status: 'error',
                fired: false,
                durationMs: 0,
                error: msg.error,
              });
            }
            settle('done');
            return;
        }
      };
      const withPack = !slot.hashes.has(pack.hash);
      sentPack = withPack;
      slot.hashes.add(pack.hash);
      slot.worker.postMessage(this.runMessage(callId, pack, input, ruleIds, call, withPack));
      arm(Math.min(deadlineEpoch, epochMs() + ruleBudget));
    });
  }

  private runMessage(
    callId: number,
    pack: CompiledPack,
    input: SerializedInput,
    ruleIds: string[],
    call: CallState,
    withPack: boolean,
  ): RunMessage {
    const msg: RunMessage = {
      type: 'run',
      callId,
      hash: pack.hash,
      input,
      ruleIds,
      failedLets: { ...call.failedLets },
      flushEach: call.attempts > 1,
    };
    if (call.traceValues) {
      msg.traceValues = true;
    }
    if (withPack) {
      msg.pack = pack.pack;
    }
    return msg;
  }

  private isClosed(): boolean {
    return this.closed;
  }

  ready(): Promise<void> {
    return this.pool.whenReady();
  }

  warm(pack: CompiledPack): void {
    if (!this.closed) {
      this.pool.warmAll(pack);
    }
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.pool.close();
  }

  stats(): EvaluatorStats {
    const load = this.pool.load();
    const warming = this.pool.warming();
    return {
      workersStarted: this.pool.started,
      workersReplaced: this.pool.replaced,
      workersCrashed: this.pool.crashed,
      workers: load.workers,
      busyWorkers: load.busy,
      queuedCalls: load.queued,
      inline: this.inline,
      handedOff: this.handedOff,
      compileOverruns: this.pool.compileOverruns,
      compiledAside: this.compiledAside,
      warmingWorkers: warming.workers,
      warmsPending: warming.pending,
      warmed: this.pool.warmed,
      calls: this.calls,
    };
  }

  budgets(): EvaluatorBudgets {
    return { callBudgetMs: this.callBudgetMs, ruleBudgetMs: this.ruleBudgetMs };
  }
}

/** Runs the call's rules of `program` over `input` in this thread, recording into `call`. */
function runInto(
  call: CallState,
  program: PackProgram,
  input: EvaluationInput,
  shouldStop?: () => boolean,
): void {
  runRules(program, input, call.ruleIds, {
    onLet: (e) => {
      call.addLet(e);
    },
    onRule: (e, card) => {
      call.set(e, card);
    },
    ...(shouldStop ? { shouldStop } : {}),
    ...(call.traceValues ? { traceValues: true } : {}),
  });
}

/** @throws RangeError unless `value` is a finite number >= 0. */
function nonNegative(name: string, value: number): number {
  if (!(value >= 0) || !Number.isFinite(value)) {
    throw new RangeError(`${name} must be a finite number >= 0`);
  }
  return value;
}

class InlineEvaluator implements Evaluator {
  private closed = false;
  private calls = 0;

  constructor(
    private readonly callBudgetMs: number,
    private readonly ruleBudgetMs: number,
  ) {}

  evaluate(
    pack: CompiledPack,
    serviceId: string,
    input: EvaluationInput,
    opts: EvaluateOptions = {},
  ): Promise<EvaluationResult> {
    if (this.closed) {
      return Promise.reject(new Error('evaluator is closed'));
    }
    const started = performance.now();
    const deadline = started + this.callBudgetMs;
    let call: CallState;
    try {
      call = new CallState(ruleIdsOf(pack, serviceId));
      call.traceValues = opts.traceValues === true;
    } catch (err) {
      return Promise.reject(err instanceof Error ? err : new Error('evaluation failed'));
    }
    this.calls++;
    try {
      const program = programFor(pack.hash, pack.pack);
      // Same isolation as a worker: the rules see a private copy of the input.
      runInto(call, program, structuredClone(input), () => performance.now() >= deadline);
    } catch {
      for (const id of call.remaining()) {
        call.set({
          ruleId: id,
          status: 'error',
          fired: false,
          durationMs: 0,
          error: 'the pack does not compile',
        });
      }
    }
    return Promise.resolve(call.finish(pack, serviceId, started, 'call budget exhausted'));
  }

  ready(): Promise<void> {
    return this.closed ? Promise.reject(new Error('evaluator is closed')) : Promise.resolve();
  }

  /** Nothing to compile ahead: the calling thread compiles on first use. */
  warm(): void {
    // No workers.
  }

  close(): Promise<void> {
    this.closed = true;
    return Promise.resolve();
  }

  stats(): EvaluatorStats {
    return { workersStarted: 0, workersReplaced: 0, calls: this.calls };
  }

  /** The rule budget is not enforced here (no preemption); it is reported as created. */
  budgets(): EvaluatorBudgets {
    return { callBudgetMs: this.callBudgetMs, ruleBudgetMs: this.ruleBudgetMs };
  }
}

/**
 * Evaluates the rules of `serviceId` (or only `ruleIds`, in pack order) synchronously in the
 * calling thread, with no time budget and without copying the input: for benchmarks and tools
 * that own their input and trust the pack. Same semantics and results as `evaluate`
 * (`opts.traceValues`: see EvaluateOptions).
 * @throws UnknownServiceError if the pack has no such service; PackValidationError if it does
 *   not compile.
 */
export function evaluateInline(
  pack: CompiledPack,
  serviceId: string,
  input: EvaluationInput,
  ruleIds?: readonly string[],
  opts: Pick<EvaluateOptions, 'traceValues'> = {},
): EvaluationResult {
  const started = performance.now();
  const all = ruleIdsOf(pack, serviceId);
  const call = new CallState(ruleIds ? all.filter((id) => ruleIds.includes(id)) : all);
  call.traceValues = opts.traceValues === true;
  runInto(call, programFor(pack.hash, pack.pack), input);
  return call.finish(pack, serviceId, started, 'call budget exhausted');
}

/**
 * Creates an evaluator. Defaults: callBudgetMs 2000, ruleBudgetMs 500,
 * workers min(2, availableParallelism()). Workers start at once (so the first call does not
 * pay for their startup) and do not keep the process alive; call `close()` when done.
 * @throws RangeError for a non-positive budget or a negative worker count.
 */
export function createEvaluator(opts: EvaluatorOptions = {}): Evaluator {
  const callBudgetMs = opts.callBudgetMs ?? 2000;
  const ruleBudgetMs = opts.ruleBudgetMs ?? 500;
  const workers = opts.workers ?? Math.min(2, availableParallelism());
  if (!(callBudgetMs > 0) || !(ruleBudgetMs > 0)) {
    throw new RangeError('evaluation budgets must be positive');
  }
  if (!Number.isInteger(workers) || workers < 0) {
    throw new RangeError('workers must be a non-negative integer');
  }
  if (workers === 0) {
    return new InlineEvaluator(callBudgetMs, ruleBudgetMs);
  }
  const inlineSliceMs = nonNegative('inlineSliceMs', opts.inlineSliceMs ?? 0);
  const inlineRetryMs = nonNegative('inlineRetryMs', opts.inlineRetryMs ?? 60_000);
  return new PooledEvaluator(
    callBudgetMs,
    ruleBudgetMs,
    workers,
    opts.workerMemoryMb ?? 512,
    inlineSliceMs,
    inlineRetryMs,
  );
}
