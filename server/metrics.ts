/**
 * Prometheus metrics (prom-client), one registry per app: no global default registry, so two
 * apps in one process (tests, one plane per region) never share or collide.
 *
 * Labels are bounded and carry no tenant ids and no payload: per-call metrics are labelled by
 * service, outcome, pack and rule ids (all from the rule-pack catalog), fetch outcome and auth
 * failure reason (closed sets). A tenant id in a label would make cardinality grow with the
 * customer base and would put a tenant's name into every region's scrape, which residency
 * forbids for regions that may not serve it. Rewrap jobs are per tenant, so their gauges are
 * summed by job kind; the job id (which names the tenant) is only a key in memory.
 * Every registry carries a `region` default label.
 */
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';
import type { PrefetchObserver } from '../hooks/index.ts';

/**
 * How a CDS Hooks request ended. `unavailable`: refused with 503 because the replay cache's
 * backend (Redis) is down or may evict keys; `error`: any other 5xx.
 */
export type HookOutcome =
  | 'ok'
  | 'client_error'
  | 'prefetch_failed'
  | 'unauthorized'
  | 'misdirected'
  | 'unavailable'
  | 'error';

/** Which CDS Hooks endpoint was called. */
export type HookEndpoint = 'discovery' | 'call' | 'feedback';

/** What a prefetch fetch ended with (hooks/ `PrefetchObserver` outcomes). */
export type PrefetchFetchOutcome = 'ok' | 'error' | 'timeout' | 'refused';

/** Which authentication surface refused a credential. */
export type AuthSurface = 'cds' | 'admin' | 'app';

/** The job fields metrics read (tenants/ `JobInfo` is a superset). */
export interface JobProgress {
  /** Kept in memory only, never a label (it names the tenant). */
  id: string;
  kind: string;
  status: string;
  done: number;
  total: number;
}

export interface MetricsOptions {
  /** This plane's region: a default label on every series. */
  region: string;
  /** Collect Node.js process metrics (default true). */
  defaultMetrics?: boolean;
  /** Distinct values kept per open-ended label (service, pack, rule); beyond it: `other`. */
  maxLabelValues?: number;
  /**
   * Polled on each `render()`: the jobs of this plane worth showing (at least the running
   * ones). A running job missing from the next poll leaves the gauges (it is not counted as
   * finished: its end state is unknown). Errors are ignored: the scrape still answers. Or push
   * with `jobProgress` when jobs report their own progress.
   */
  jobs?: () => Promise<readonly JobProgress[]>;
  /** Read on each scrape: the evaluator's counters (where calls were evaluated). */
  evaluations?: () => { calls: number; inline?: number; handedOff?: number };
  /**
   * Read on each scrape (nothing on the hook path): the evaluation worker pool's load and its
   * workers' ends (rules/ `EvaluatorStats`).
   */
  workerPool?: () => WorkerPoolLoad;
  /** Read on each scrape: the tenant stores this region holds open (tenants/ `stats().open`). */
  openStores?: () => number;
}

/** The worker pool fields metrics read (rules/ `EvaluatorStats` is a superset). */
export interface WorkerPoolLoad {
  workers?: number;
  busyWorkers?: number;
  queuedCalls?: number;
  workersReplaced: number;
  workersCrashed?: number;
}

/** Which kind of record a store write committed. */
export type StoreRecordKind = 'invocation' | 'feedback';

const LABEL_VALUE = /^[A-Za-z0-9._:@/-]{1,128}$/;
const HOOK_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10];
/** A store write: ~1-3 ms when idle (group commit), tens of ms under load or a rotation batch. */
const STORE_WRITE_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5];

/** Maps an HTTP status of a CDS Hooks response to its outcome label. */
export function hookOutcomeForStatus(status: number): HookOutcome {
  if (status < 400) {
    return 'ok';
  }
  switch (status) {
    case 401:
      return 'unauthorized';
    case 412:
      return 'prefetch_failed';
    case 421:
      return 'misdirected';
    default:
      return status >= 500 ? 'error' : 'client_error';
  }
}

/** Keeps a label's value set bounded: odd values become `invalid`, values past the cap `other`. */
class BoundedLabel {
  private readonly seen = new Set<string>();
  constructor(private readonly max: number) {}
  value(raw: string | undefined, fallback = 'unknown'): string {
    if (raw === undefined || raw === '') {
      return fallback;
    }
    if (!LABEL_VALUE.test(raw)) {
      return 'invalid';
    }
    if (this.seen.has(raw)) {
      return raw;
    }
    if (this.seen.size >= this.max) {
      return 'other';
    }
    this.seen.add(raw);
    return raw;
  }
}

function oneOf<T extends string>(value: string, allowed: readonly T[], fallback: T): T {
  return (allowed as readonly string[]).includes(value) ? (value as T) : fallback;
}

const HOOK_OUTCOMES: readonly HookOutcome[] = [
  'ok',
  'client_error',
  'prefetch_failed',
  'unauthorized',
  'misdirected',
  'unavailable',
  'error',
];
const FETCH_OUTCOMES: readonly PrefetchFetchOutcome[] = ['ok', 'error', 'timeout', 'refused'];
const RULE_FAILURE_OUTCOMES = ['error', 'timeout', 'skipped'] as const;
const JOB_KINDS = ['dek-rewrap', 'kek-rewrap', 'migration', 'other'] as const;
const JOB_END_STATES = ['done', 'failed', 'superseded', 'other'] as const;
const FINISHED_MEMORY = 1000;

/** The app's metrics: small typed recorders and `render()` for `GET /metrics`. */
export class Metrics {
  /** This app's own registry. */
  readonly registry: Registry;
  private readonly hookSeconds: Histogram<'endpoint' | 'service' | 'outcome'>;
  private readonly ruleFailures: Counter<'pack' | 'rule' | 'outcome'>;
  private readonly prefetchFetches: Counter<'outcome'>;
  private readonly authFailures: Counter<'surface' | 'reason'>;
  private readonly auditWriteFailures: Counter<'event'>;
  private readonly adminForbiddens: Counter<'action'>;
  private readonly jobsRunning: Gauge<'kind'>;
  private readonly jobDone: Gauge<'kind'>;
  private readonly jobTotal: Gauge<'kind'>;
  private readonly jobsFinished: Counter<'kind' | 'status'>;
  private readonly recordsPurged: Counter<'kind'>;
  private readonly purgeFailures: Counter;
  private readonly storeWriteSeconds: Histogram<'record'>;
  private readonly evaluationsSeen = { inline: 0, worker: 0, handed_off: 0 };
  private readonly services: BoundedLabel;
  private readonly packs: BoundedLabel;
  private readonly rules: BoundedLabel;
  private readonly reasons: BoundedLabel;
  private readonly running = new Map<string, { kind: string; done: number; total: number }>();
  private readonly finished = new Set<string>();
  private readonly jobSource: MetricsOptions['jobs'];

  constructor(opts: MetricsOptions) {
    this.jobSource = opts.jobs;
    const max = opts.maxLabelValues ?? 200;
    this.services = new BoundedLabel(max);
    this.packs = new BoundedLabel(max);
    this.rules = new BoundedLabel(max * 10);
    this.reasons = new BoundedLabel(64);
    this.registry = new Registry();
    this.registry.setDefaultLabels({ region: opts.region });
    const registers = [this.registry];
    this.hookSeconds = new Histogram({
      name: 'cellcds_hook_duration_seconds',
      help: 'CDS Hooks request latency by endpoint, service and outcome',
      labelNames: ['endpoint', 'service', 'outcome'],
      buckets: HOOK_BUCKETS,
      registers,
    });
    this.ruleFailures = new Counter({
      name: 'cellcds_rule_failures_total',
      help: 'Rule evaluations that errored, ran out of time or were skipped (call budget spent), by pack and rule id',
      labelNames: ['pack', 'rule', 'outcome'],
      registers,
    });
    this.prefetchFetches = new Counter({
      name: 'cellcds_prefetch_fetches_total',
      help: 'Prefetch fetches from EHR FHIR servers, by outcome (ok, error, timeout, refused)',
      labelNames: ['outcome'],
      registers,
    });
    this.authFailures = new Counter({
      name: 'cellcds_auth_failures_total',
      help: 'Refused credentials by surface and reason',
      labelNames: ['surface', 'reason'],
      registers,
    });
    this.adminForbiddens = new Counter({
      name: 'cellcds_admin_forbidden_total',
      help: "Admin API requests refused by the policy (403, or 404 for another tenant's token), by the action refused",
      labelNames: ['action'],
      registers,
    });
    this.auditWriteFailures = new Counter({
      name: 'cellcds_audit_write_failures_total',
      help: 'Audit events of refused requests that could not be written (the request was refused all the same; see the log line "refusal not audited")',
      labelNames: ['event'],
      registers,
    });
    this.jobsRunning = new Gauge({
      name: 'cellcds_rewrap_jobs_running',
      help: 'Key rewrap jobs running in this process, by kind',
      labelNames: ['kind'],
      registers,
    });
    this.jobDone = new Gauge({
      name: 'cellcds_rewrap_records_done',
      help: 'Records (or tenants, for KEK jobs) already rewrapped by running jobs, by kind',
      labelNames: ['kind'],
      registers,
    });
    this.jobTotal = new Gauge({
      name: 'cellcds_rewrap_records_total',
      help: 'Records (or tenants, for KEK jobs) to rewrap by running jobs, by kind',
      labelNames: ['kind'],
      registers,
    });
    this.jobsFinished = new Counter({
      name: 'cellcds_rewrap_jobs_finished_total',
      help: 'Key rewrap jobs that stopped, by kind and final status',
      labelNames: ['kind', 'status'],
      registers,
    });
    this.recordsPurged = new Counter({
      name: 'cellcds_records_purged_total',
      help: "Records deleted by retention purges (a tenant's retention period), by kind (invocation, feedback)",
      labelNames: ['kind'],
      registers,
    });
    this.purgeFailures = new Counter({
      name: 'cellcds_record_purge_failures_total',
      help: 'Retention purges of a tenant that failed (retried at the next pass; see the log line "record purge failed for a tenant")',
      registers,
    });
    const evaluations = opts.evaluations;
    if (evaluations) {
      const seen = this.evaluationsSeen;
      new Counter({
        name: 'cellcds_evaluations_total',
        help: 'Hook evaluations by where they ran: inline (the calling thread, under a time slice) or worker; handed_off counts inline attempts that went on in a worker',
        labelNames: ['where'],
        registers,
        collect() {
          const s = evaluations();
          const now = {
            inline: s.inline ?? 0,
            worker: s.calls - (s.inline ?? 0),
            handed_off: s.handedOff ?? 0,
          };
          for (const where of ['inline', 'worker', 'handed_off'] as const) {
            if (now[where] > seen[where]) {
              this.inc({ where }, now[where] - seen[where]);
              seen[where] = now[where];
            }
          }
        },
      });
    }
    this.storeWriteSeconds = new Histogram({
      name: 'cellcds_store_write_duration_seconds',
      help: "Time from a record's write request to its durable commit in the tenant's store, by record kind (per region, never per tenant)",
      labelNames: ['record'],
      buckets: STORE_WRITE_BUCKETS,
      registers,
    });
    this.registerWorkerPool(opts.workerPool);
    const openStores = opts.openStores;
    if (openStores) {
      new Gauge({
        name: 'cellcds_tenant_stores_open',
        help: 'Tenant stores this region holds open now (bounded by CELLCDS_MAX_OPEN_STORES, but for stores in use)',
        registers,
        collect() {
          this.set(openStores());
        },
      });
    }
    if (opts.defaultMetrics ?? true) {
      collectDefaultMetrics({ register: this.registry });
    }
  }

  /**
   * The evaluation worker pool, read on each scrape: gauges of its size, busy workers and calls
   * waiting for a worker; counters of workers replaced (stopped by the pool: a rule overran its
   * budget, or the worker died during a call) and of workers that crashed (exited on their own).
   */
  private registerWorkerPool(source: (() => WorkerPoolLoad) | undefined): void {
    if (!source) {
      return;
    }
    const registers = [this.registry];
    new Gauge({
      name: 'cellcds_eval_workers',
      help: 'Evaluation worker threads serving calls (CELLCDS_EVAL_WORKERS; the idle spare not counted)',
      registers,
      collect() {
        this.set(source().workers ?? 0);
      },
    });
    new Gauge({
      name: 'cellcds_eval_workers_busy',
      help: 'Evaluation workers running a call now',
      registers,
      collect() {
        this.set(source().busyWorkers ?? 0);
      },
    });
    new Gauge({
      name: 'cellcds_eval_queue_depth',
      help: 'Hook calls waiting for a free evaluation worker now',
      registers,
      collect() {
        this.set(source().queuedCalls ?? 0);
      },
    });
    const counted = { replaced: 0, crashed: 0 };
    const counter = (
      key: keyof typeof counted,
      name: string,
      help: string,
      read: (l: WorkerPoolLoad) => number,
    ) => {
      new Counter({
        name,
        help,
        registers,
        collect() {
          const now = read(source());
          if (now > counted[key]) {
            this.inc(now - counted[key]);
            counted[key] = now;
          }
        },
      });
    };
    counter(
      'replaced',
      'cellcds_eval_workers_replaced_total',
      'Evaluation workers stopped and replaced by the spare: a rule overran its budget, or the worker died during a call',
      (l) => l.workersReplaced,
    );
    counter(
      'crashed',
      'cellcds_eval_workers_crashed_total',
      'Evaluation workers that exited on their own (crashed, out of heap, failed to start); restarted by the pool',
      (l) => l.workersCrashed ?? 0,
    );
  }

  /**
   * Records one committed store write: `seconds` from the write's request (the store call) to
   * its durable commit. Labelled by record kind only: the region is the registry's label, and
   * a tenant never is.
   */
  storeWrite(record: StoreRecordKind, seconds: number): void {
    this.storeWriteSeconds.observe(
      { record: oneOf(record, ['invocation', 'feedback'], 'invocation') },
      Number.isFinite(seconds) && seconds >= 0 ? seconds : 0,
    );
  }

  /** The Content-Type of `render()`'s text. */
  get contentType(): string {
    return this.registry.contentType;
  }

  /**
   * Records one CDS Hooks request. Pass `service` only once it resolved to a service of the
   * tenant's catalog; an unresolved id (404, 401) must be `undefined`, so that callers cannot
   * create label values.
   */
  observeHook(
    endpoint: HookEndpoint,
    service: string | undefined,
    outcome: HookOutcome,
    seconds: number,
  ): void {
    this.hookSeconds.observe(
      {
        endpoint: oneOf(endpoint, ['discovery', 'call', 'feedback'], 'call'),
        service: this.services.value(service, 'none'),
        outcome: oneOf(outcome, HOOK_OUTCOMES, 'error'),
      },
      Number.isFinite(seconds) && seconds >= 0 ? seconds : 0,
    );
  }

  /**
   * Counts one rule that errored, timed out or was skipped when its call's budget ran out (pack
   * and rule ids from the catalog).
   */
  ruleOutcome(pack: string, ruleId: string, outcome: 'error' | 'timeout' | 'skipped'): void {
    this.ruleFailures.inc({
      pack: this.packs.value(pack),
      rule: this.rules.value(ruleId),
      outcome: oneOf(outcome, RULE_FAILURE_OUTCOMES, 'error'),
    });
  }

  /** Counts the entries of an evaluation trace that did not complete (error, timeout, skipped). */
  ruleTrace(pack: string, trace: readonly { ruleId: string; status: string }[]): void {
    for (const entry of trace) {
      if ((RULE_FAILURE_OUTCOMES as readonly string[]).includes(entry.status)) {
        this.ruleOutcome(
          pack,
          entry.ruleId,
          entry.status as (typeof RULE_FAILURE_OUTCOMES)[number],
        );
      }
    }
  }

  /** Counts one prefetch fetch by outcome. */
  prefetchFetch(outcome: PrefetchFetchOutcome): void {
    this.prefetchFetches.inc({ outcome: oneOf(outcome, FETCH_OUTCOMES, 'error') });
  }

  /** A hooks/ `PrefetchObserver` that counts fetches (the prefetch key is not recorded). */
  prefetchObserver(): PrefetchObserver {
    return {
      onFetch: (outcome) => {
        this.prefetchFetch(outcome);
      },
    };
  }

  /** Counts one refused credential (`reason`: an AuthFailureReason or a short admin reason). */
  authFailure(reason: string, surface: AuthSurface = 'cds'): void {
    this.authFailures.inc({
      surface: oneOf(surface, ['cds', 'admin', 'app'], 'cds'),
      reason: this.reasons.value(reason.replace(/\s+/g, '_')),
    });
  }

  /** Counts an admin request the policy refused (`action`: ADMIN_ACTIONS or `unknown`). */
  adminForbidden(action: string): void {
    this.adminForbiddens.inc({ action: this.reasons.value(action) });
  }

  /** A tenant's retention purge: what it deleted, or that it failed. */
  recordPurge(outcome: { invocations: number; feedback: number } | 'failed'): void {
    if (outcome === 'failed') {
      this.purgeFailures.inc();
      return;
    }
    this.recordsPurged.inc({ kind: 'invocation' }, outcome.invocations);
    this.recordsPurged.inc({ kind: 'feedback' }, outcome.feedback);
  }

  /** Counts an audit event of a refusal that could not be written (`event`: its type). */
  auditWriteFailure(event: string): void {
    this.auditWriteFailures.inc({
      event: oneOf(
        event,
        ['auth.failure', 'residency.misdirected', 'admin.auth', 'admin.forbidden'],
        'other',
      ),
    });
  }

  private readyGauge: Gauge<'part'> | undefined;

  /**
   * One readiness part's state as `/readyz` last saw it (`cellcds_ready{part}`: 1 up, 0 down).
   * `part` is one of `/readyz`'s parts (controlPlane, keyProvider, dataPlane, replayCache).
   */
  readiness(part: string, up: boolean): void {
    this.readyGauge ??= new Gauge({
      name: 'cellcds_ready',
      help: 'Whether a part of this plane was ready at the last /readyz probe (1) or down (0)',
      labelNames: ['part'],
      registers: [this.registry],
    });
    this.readyGauge.set(
      { part: oneOf(part, ['controlPlane', 'keyProvider', 'dataPlane', 'replayCache'], 'other') },
      up ? 1 : 0,
    );
  }

  /**
   * Reports a rewrap (or migration) job's progress. Gauges sum the running jobs by kind; a job
   * that stopped (`status` other than `running`) is counted once in the finished counter.
   */
  jobProgress(job: JobProgress): void {
    this.recordJob(job);
    this.updateJobGauges();
  }

  private recordJob(job: JobProgress): void {
    const kind = oneOf(job.kind, JOB_KINDS, 'other');
    if (job.status === 'running') {
      this.running.set(job.id, {
        kind,
        done: Math.max(0, job.done),
        total: Math.max(0, job.total),
      });
    } else {
      this.running.delete(job.id);
      if (!this.finished.has(job.id)) {
        this.finished.add(job.id);
        if (this.finished.size > FINISHED_MEMORY) {
          const oldest = this.finished.values().next().value;
          if (oldest !== undefined) {
            this.finished.delete(oldest);
          }
        }
        this.jobsFinished.inc({ kind, status: oneOf(job.status, JOB_END_STATES, 'other') });
      }
    }
  }

  private updateJobGauges(): void {
    for (const k of JOB_KINDS) {
      const jobs = [...this.running.values()].filter((j) => j.kind === k);
      this.jobsRunning.set({ kind: k }, jobs.length);
      this.jobDone.set(
        { kind: k },
        jobs.reduce((n, j) => n + j.done, 0),
      );
      this.jobTotal.set(
        { kind: k },
        jobs.reduce((n, j) => n + j.total, 0),
      );
    }
  }

  /** The Prometheus text exposition of this registry (for `GET /metrics`). */
  async render(): Promise<string> {
    if (this.jobSource) {
      try {
        const jobs = await this.jobSource();
        const listed = new Set(jobs.map((j) => j.id));
        for (const id of [...this.running.keys()]) {
          if (!listed.has(id)) {
            this.running.delete(id);
          }
        }
        for (const job of jobs) {
          this.recordJob(job);
        }
        this.updateJobGauges();
      } catch {
        // A scrape must answer even when a store is unavailable; the gauges keep their values.
      }
    }
    return this.registry.metrics();
  }
}
