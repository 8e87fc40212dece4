/**
 * Public types of the regional data plane: the key provider contract, per-tenant stores
 * (invocation records, feedback, audit chain, keys), rewrap jobs, backups.
 */
import type { KeyObject } from 'node:crypto';
import type { AuditEvent } from '../types.ts';
import type { KeyUnavailableReason } from './errors.ts';
import type { ChainHead, ChainVerification } from './hash-chain.ts';
import type { WrapLimitEvent } from './wrap-limit.ts';

// ---------------------------------------------------------------------------------------------
// Key provider (region master key = KEK). An HSM/KMS implements the same interface: every
// operation that needs the KEK or a tenant's provider key happens inside the provider.
// ---------------------------------------------------------------------------------------------

/** `primary` wraps new DEKs; `retiring` awaits the region's DEK rewrap; `retired` unwraps only. */
export type KekStatus = 'primary' | 'retiring' | 'retired';

/** A DEK wrapped by the provider (JWE compact for the local keyring; opaque to callers). */
export interface WrappedDek {
  wrapped: string;
  kekVersion: number;
}

/** Where a provider holds its keys (no key material). */
export interface KeyProviderInfo {
  /** e.g. `local-keyring`, `aws-kms`, `pkcs11`. */
  kind: string;
  region: string;
  /** Human-readable location: a file path, a key ARN, an HSM slot. */
  location: string;
  /**
   * The identity of the key material (not a secret): the same for every replica holding the
   * region's one keyring (or KMS key), another for any other. A region's stores are bound to
   * it (`keyring-binding.ts`), so a replica started on another keyring refuses to open them.
   */
  keyringId: string;
  primaryKekVersion: number;
  keks: Array<{ version: number; status: KekStatus; createdAt: string }>;
  /** Number of tenants holding a live provider key. */
  tenantKeys: number;
}

export interface KeyProviderHealth {
  ok: boolean;
  kind: string;
  /** Safe text when not ok. */
  detail?: string;
}

/**
 * The region's key provider. DEKs cross this boundary only wrapped, except `unwrapDek`'s
 * result, which the caller keeps in process memory only. Per-tenant provider keys make
 * crypto-shredding possible: after `destroyTenantKey(t)` no wrapped DEK of `t` (including the
 * ones in old backups) can be unwrapped, even with every KEK.
 */
export interface KeyProvider {
  readonly region: string;
  /** Where the keys are held, KEK versions and states. */
  describe(): Promise<KeyProviderInfo>;
  /** Can the provider wrap and unwrap right now? Never throws. */
  health(): Promise<KeyProviderHealth>;
  /**
   * Creates the tenant's provider key if it has none. A tenant whose key was destroyed gets a
   * new one only with `{ recreate: true }` (an explicit re-provisioning).
   * @throws KeyUnavailableError('tenant_key_destroyed') for a destroyed tenant without recreate.
   */
  createTenantKey(tenant: string, opts?: { recreate?: boolean }): Promise<'created' | 'exists'>;
  /** Does the tenant hold a live provider key? */
  hasTenantKey(tenant: string): Promise<boolean>;
  /** Wraps a DEK under the primary KEK for `tenant`; `aad` is bound into the wrap. */
  wrapDek(tenant: string, dek: KeyObject, aad: string): Promise<WrappedDek>;
  /**
   * Unwraps a DEK. @throws KeyUnavailableError: `tenant_key_destroyed`, `unknown_kek`,
   * `unwrap_failed` (tampered, another tenant's or another aad's wrap), `provider`.
   */
  unwrapDek(tenant: string, wrapped: string, aad: string): Promise<KeyObject>;
  /** Re-wraps under the primary KEK without the DEK leaving the provider. @throws as unwrapDek. */
  rewrapDek(tenant: string, wrapped: string, aad: string): Promise<WrappedDek>;
  /** Crypto-shreds the tenant's provider key. Returns false if it had none. */
  destroyTenantKey(tenant: string): Promise<boolean>;
  /** Makes a new KEK primary; older non-retired KEKs become `retiring`. */
  rotateKek(): Promise<{ primary: number; retiring: number[] }>;
  /** Marks `retiring` KEKs `retired` (called once every DEK of the region was rewrapped). */
  completeKekRotation(): Promise<void>;
}

// ---------------------------------------------------------------------------------------------
// Tenant store
// ---------------------------------------------------------------------------------------------

/** The pack version that produced the cards. */
export interface PackStamp {
  id: string;
  version: string;
  hash: string;
}

/** The PHI part of an invocation: sealed with the tenant's primary DEK. */
export interface InvocationSecret {
  context: unknown;
  prefetch: unknown;
  cards: unknown;
  trace: unknown;
}

/** Input of `saveInvocation`. Everything but `secret` is stored in clear, so no PHI there. */
export type NewInvocation = NewInvocationBase &
  (
    | { secret: InvocationSecret; secretJson?: never }
    | {
        /**
         * The secret already serialized, for a caller that has the JSON text anyway (the hook
         * path serializes context and prefetch once for the evaluator): a JSON object whose
         * members are exactly `context`, `prefetch`, `cards` and `trace`, in that order.
         */
        secretJson: string;
        secret?: never;
      }
  );

interface NewInvocationBase {
  /** Unique per tenant: letters, digits, `._:-`, at most 128 characters. */
  id: string;
  time: string | Date;
  service: string;
  hook: string;
  hookInstance: string;
  pack: PackStamp;
  cardUuids: readonly string[];
  suggestionUuids: readonly string[];
  /**
   * The suggestion uuids of each card, in the order of `cardUuids`: together exactly
   * `suggestionUuids`, each under one card. Feedback on a card may accept only its own (CDS Hooks
   * 2.0). Without it the store knows only the invocation's list, and feedback on these cards is
   * checked against that (as for records written before schema 5). Not part of the summary.
   */
  cardSuggestionUuids?: ReadonlyArray<readonly string[]>;
  /**
   * Each card's rule and the override reason codes it offered, in the order of `cardUuids`:
   * pack metadata, stored in clear on the card's link (schema 6) for the override-rate report
   * (`feedbackSummary`). Without it the cards count under rule "unknown". Not part of the summary.
   */
  cardRules?: ReadonlyArray<CardRule>;
}

/** Which rule made a card, and what it offered to override it with (pack metadata, no PHI). */
export interface CardRule {
  /** The rule's id in its pack. */
  ruleId: string;
  /**
   * The card's `overrideReasons` as `system|code` (from the pack's card template, never
   * interpolated): an override naming one of them is counted under it. Codes that are not a
   * printable `system|code` of at most 510 characters are left out (never a refused call).
   */
  overrideReasons?: readonly string[];
}

/** Window of `feedbackSummary`: cards shown from `since` (inclusive) to `until` (exclusive). */
export interface FeedbackSummaryQuery {
  /** Default: 30 days before `until`. */
  since?: string | Date;
  /** Default: now. */
  until?: string | Date;
}

/** One (pack, version, rule) row of the override-rate report: counts only, no PHI. */
export interface FeedbackSummaryRow {
  packId: string;
  packVersion: string;
  /** Null: cards stored before the store knew their rule (schema 6), counted as "unknown". */
  ruleId: string | null;
  /** Cards shown in the window. */
  shown: number;
  /** Of those, cards with at least one `accepted` feedback. */
  accepted: number;
  /** Of those, cards with at least one `overridden` feedback. */
  overridden: number;
  /** overridden / (accepted + overridden), or null when neither. */
  overrideRate: number | null;
  /**
   * Overridden cards per override reason code (`system|code`), only codes the card offered;
   * overrides with no such code (none given, free text only, another code, or stored before
   * schema 6) count in `overridden` only.
   */
  reasons: Record<string, number>;
}

/** The override-rate report of `feedbackSummary`. */
export interface FeedbackSummary {
  tenant: string;
  since: string;
  until: string;
  rows: FeedbackSummaryRow[];
}

/** Invocation metadata (clear columns, no PHI). */
export interface InvocationSummary {
  id: string;
  /** ISO 8601 instant (UTC). */
  time: string;
  service: string;
  hook: string;
  hookInstance: string;
  pack: PackStamp;
  cardUuids: string[];
  suggestionUuids: string[];
  /** DEK version that seals the record now. */
  keyVersion: number;
}

/** A decrypted invocation record with its decrypted feedback. */
export interface InvocationRecord extends InvocationSummary {
  secret: InvocationSecret;
  feedback: FeedbackRecord[];
}

/** Filters of `listInvocations`: `from` inclusive, `to` exclusive, `limit` 1..1000 (100). */
export interface InvocationQuery {
  from?: string | Date;
  to?: string | Date;
  hook?: string;
  limit?: number;
}

/** One feedback item (structurally a CDS Hooks 2.0 feedback entry, already validated). */
export interface FeedbackInput {
  card: string;
  outcome: 'accepted' | 'overridden';
  acceptedSuggestions?: Array<{ id: string }>;
  overrideReason?: {
    reason?: { code: string; system: string; display?: string };
    userComment?: string;
  };
  outcomeTimestamp: string;
}

/** Stored feedback, decrypted. */
export interface FeedbackRecord {
  /**
   * Idempotency id: sha256 of (card, outcome, outcomeTimestamp, the set of accepted suggestion
   * ids), or of those and a variant number for a further report of that identity with another
   * override reason (never of the reason itself: ids are in clear).
   */
  id: string;
  invocationId: string;
  service: string;
  card: string;
  outcome: 'accepted' | 'overridden';
  /** ISO 8601 instant the service stored it. */
  receivedAt: string;
  keyVersion: number;
  item: FeedbackInput;
}

/** A feedback item `saveFeedback` did not store (`partial`): it names nothing this tenant has. */
export interface FeedbackRefusal {
  /** The item's index in the batch. */
  index: number;
  /**
   * `card`: a card this service never sent to this tenant (or sent to another tenant: the
   * same); `suggestion`: an accepted suggestion the card never offered.
   */
  what: 'card' | 'suggestion';
  /** For `suggestion`: the index in the item's `acceptedSuggestions` of the first refused. */
  suggestion?: number;
}

export interface SaveFeedbackResult {
  /** Newly stored items. */
  stored: number;
  /** Items already stored (exact repeats: same card, outcome, instant, reason, suggestions). */
  duplicates: number;
  /**
   * With `partial`: the items refused, in input order (empty if none). Absent otherwise (a
   * refused item throws).
   */
  refused?: FeedbackRefusal[];
  /** Feedback ids, in input order (a refused item's names nothing stored). */
  ids: string[];
}

/** A tenant audit event: the store's tenant is implicit. No PHI, no secrets. */
export type TenantAuditInput = Omit<AuditEvent, 'tenant'>;

/** An event of the tenant's hash-chained audit log. */
export interface ChainedAuditEvent extends TenantAuditInput {
  seq: number;
  /** ISO 8601 instant (UTC). */
  at: string;
  prevHash: string;
  hash: string;
}

/** The tenant's append-only, hash-chained audit log. */
export interface TenantAudit {
  /** Appends one event. @throws InvalidInputError for a malformed event. */
  append(event: TenantAuditInput): Promise<ChainedAuditEvent>;
  /** Events in `seq` order after `afterSeq` (default 0), at most `limit` (1..10 000, 1000). */
  list(opts?: { afterSeq?: number; limit?: number }): Promise<ChainedAuditEvent[]>;
  /** Walks the whole chain and checks it against the head anchor. */
  verify(): Promise<ChainVerification>;
  /** The head anchor as stored. */
  head(): Promise<ChainHead>;
}

export type DekStatus = 'primary' | 'active' | 'retired' | 'destroyed';

export interface DekVersionInfo {
  version: number;
  /**
   * `primary`: seals new records. `active`: older, still opens records (scheduled rotation).
   * `retired`: compromised (emergency rotation), opens records only until they are
   * rewrapped. `destroyed`: wrapped key erased.
   */
  status: DekStatus;
  /** KEK version wrapping it (null once destroyed). */
  kekVersion: number | null;
  compromised: boolean;
  createdAt: string;
  retiredAt?: string;
  destroyedAt?: string;
  /** Records (invocations + feedback) sealed under this version now. */
  records: number;
  /**
   * AES-GCM encryptions made under this version so far (records sealed, record keys re-wrapped
   * or re-sealed by rotations), kept in the store. For a version that existed before the store
   * counted them (schema 4), a lower bound: its records and heads at the upgrade, not those
   * since deleted.
   */
  wraps: number;
}

export interface KeyStatus {
  tenant: string;
  primary: number;
  versions: DekVersionInfo[];
  /**
   * The wrap limits of a version: at `soft` the primary is rotated automatically, at `hard`
   * writes under it are refused (`KeyUnavailableError('wrap_limit')`, HTTP 503).
   */
  wrapLimits: { soft: number; hard: number };
  /** The running rewrap job, if any. */
  runningJob?: string;
}

export interface TenantKeys {
  status(): Promise<KeyStatus>;
  /**
   * Makes a new DEK version primary at once and starts a rewrap job (returned). Scheduled: the
   * job is throttled and old versions are destroyed when it ends with no record under them.
   * Emergency: the old primary is marked compromised (`retired`), the job runs unthrottled and
   * destroys it as soon as no record uses it; a running job is superseded.
   * @throws ConflictError for a scheduled rotation while a rewrap job runs (if no live replica
   *   holds that job's lease, it is taken over and runs here).
   */
  rotate(opts?: { emergency?: boolean; actor?: string }): Promise<JobInfo>;
}

/** One tenant's store in this region. Methods return plain objects. */
export interface TenantStore {
  readonly tenant: string;
  readonly region: string;
  /**
   * Stores an invocation: metadata in clear, `secret` sealed with the primary DEK. Durable
   * (committed, synced) when the promise resolves.
   * @throws InvalidInputError (bad field), ConflictError (id or a card uuid already stored),
   *   KeyUnavailableError.
   */
  saveInvocation(input: NewInvocation): Promise<InvocationSummary>;
  /** Metadata only, ascending by time. @throws InvalidInputError for bad filters. */
  listInvocations(query?: InvocationQuery): Promise<InvocationSummary[]>;
  /**
   * Decrypts one record (and its feedback) and appends a `record.read` audit event.
   * @throws NotFoundError, RecordOpenError.
   */
  readInvocation(id: string, opts?: { actor?: string }): Promise<InvocationRecord>;
  /** The invocation that returned this card, or undefined. */
  findCard(cardUuid: string): Promise<string | undefined>;
  /**
   * Stores feedback items, each linked to its card's invocation and each written whole or not
   * at all; exact repeats are stored once. An item naming a card this service never sent to
   * this tenant, or accepting a suggestion its card never offered, is refused: with `partial`
   * the others are stored and the refused ones returned (`refused`, even if that is all of
   * them); without it the whole batch is refused.
   * @throws NotFoundError('card' | 'suggestion') without `partial`, for the first refused item;
   *   InvalidInputError for a malformed item (nothing stored, with or without `partial`).
   */
  saveFeedback(
    items: readonly FeedbackInput[],
    opts: { service: string; partial?: boolean },
  ): Promise<SaveFeedbackResult>;
  audit: TenantAudit;
  keys: TenantKeys;
  /**
   * Deletes the invocation records whose invocation time is before `before`, with their
   * feedback, card links and head rows, in batches of one transaction each (the tenant's
   * retention period; "Retention" in DATA-PLANE.md). A run that deleted something appends one
   * `records.purged` event (cutoff and counts, no PHI). Among processes sharing the store, one
   * run at a time: another one finds `skipped: 'running_elsewhere'`.
   * @throws InvalidInputError (bad option), NotFoundError (no store), the storage's error (the
   *   batches committed before it stay deleted and are counted by the next run's event).
   */
  purgeRecords(opts: PurgeOptions): Promise<PurgeResult>;
  /**
   * The override-rate report: per pack, version and rule, the cards shown in the window (by
   * their invocation's time) and how many got accepted and overridden feedback, with counts per
   * offered override reason code. Reads clear columns only: opens no record, uses no key.
   * @throws InvalidInputError (`since`, `until`: not an instant, or not since < until).
   */
  feedbackSummary(query?: FeedbackSummaryQuery): Promise<FeedbackSummary>;
}

/** Options of `TenantStore.purgeRecords`. */
export interface PurgeOptions {
  /** Records whose invocation time is before this instant are deleted. */
  before: string | Date;
  /** Count what would be deleted; delete nothing, audit nothing. */
  dryRun?: boolean;
  /** Invocation records per batch (one transaction each), 1..1000. Default 200. */
  batchSize?: number;
  /** Recorded in `records.purged` (default `system`). */
  actor?: string;
  /** The retention period that gave `before`, recorded in `records.purged`. */
  retentionDays?: number;
  /** Called after each committed batch with the totals so far (must not throw). */
  onProgress?: (progress: PurgeProgress) => void;
  /**
   * Stops the run after the batch in flight (shutdown): what it deleted is audited at once and
   * the result says `stopped`; the next run goes on from there.
   */
  signal?: AbortSignal;
}

/** Records deleted so far by a purge run. */
export interface PurgeProgress {
  invocations: number;
  feedback: number;
  batches: number;
}

/** What a purge run did (or, `dryRun`, would do). */
export interface PurgeResult extends PurgeProgress {
  tenant: string;
  /** ISO instant: records with an invocation time before it were purged. */
  cutoff: string;
  dryRun: boolean;
  /**
   * Counted into this run's `records.purged`: deletions of an earlier run of the tenant that
   * stopped before its audit event (a crash), taken over when its lease expired.
   */
  resumed?: { invocations: number; feedback: number };
  /** `running_elsewhere`: another process (replica) holds the tenant's purge lease. */
  skipped?: 'running_elsewhere';
  /** The run was stopped (`signal`) before it reached the cutoff. */
  stopped?: boolean;
}

// ---------------------------------------------------------------------------------------------
// Jobs, backups, region
// ---------------------------------------------------------------------------------------------

export type JobKind = 'dek-rewrap' | 'kek-rewrap';
export type JobStatus = 'running' | 'done' | 'failed' | 'superseded';

/** An observable rewrap job. `rate` is records (or tenants) per second in this process. */
export interface JobInfo {
  /** `rewrap.<tenant>.<n>` or `kek.<region>.<kekVersion>`. */
  id: string;
  tenant?: string;
  region: string;
  kind: JobKind;
  status: JobStatus;
  emergency: boolean;
  done: number;
  total: number;
  rate: number;
  etaSeconds: number | null;
  startedAt: string;
  updatedAt: string;
  finishedAt?: string;
  /** Safe text (ids and reasons only). */
  error?: string;
  /**
   * A running DEK job: the replica that holds its lease and runs it (`RegionStores.jobOwner`,
   * `hostname:pid:random`), and when that lease ends unless renewed (ISO, the database's clock).
   * Absent when no replica holds it (it resumes on the next one that reads or resumes it).
   */
  leaseOwner?: string;
  leaseExpiresAt?: string;
  /**
   * A KEK rewrap job whose KEK is no longer primary: the job of the next KEK version
   * (`kek.<region>.<n>`), whose rotation could start only once this job had ended. Such a job
   * this process did not run (or no longer remembers) is reported `done`, without counts: the
   * newer rotation rewrapped every DEK.
   */
  supersededBy?: string;
}

export interface BackupResult {
  /** The backup folder (holds manifest.json, the snapshot and deks.json). */
  path: string;
  tenant: string;
  region: string;
  createdAt: string;
  counts: { invocations: number; feedback: number; auditEvents: number };
}

export interface RestoreResult {
  tenant: string;
  region: string;
  /**
   * When the backup was taken: a restore puts the store back as it was then (an older genuine
   * backup of the tenant restores too: that is point-in-time restore).
   */
  backupCreatedAt: string;
  counts: { invocations: number; feedback: number; auditEvents: number };
  /** False when the provider holds no key for the tenant: records will not open. */
  keyAvailable: boolean;
  /**
   * Why, when `keyAvailable` is false: `tenant_key_destroyed` (crypto-shredded here),
   * `tenant_key_missing` (this keyring never held it), or another key failure.
   */
  keyUnavailableReason?: KeyUnavailableReason;
  /**
   * True when the manifest's MAC verified under the key the region's provider wrapped for the
   * tenant; false only for a restore run with `allowUnauthenticated` (a format-1 manifest, or
   * a tenant whose key was destroyed).
   */
  authenticated: boolean;
}

/** Options of `RegionStores.restoreTenant`. */
export interface RestoreOptions {
  /** Refuse unless the region is this one (default: the stores' region). */
  region?: string;
  /** Refuse unless the backup is of this tenant. */
  tenant?: string;
  /**
   * Restore a backup whose manifest cannot be authenticated: a format-1 manifest (written
   * before manifests carried a MAC) or one whose MAC key no longer unwraps because the tenant's
   * key was destroyed. Recorded in `backup.restored` and in the result. A MAC that does not
   * verify is refused all the same. Default false.
   */
  allowUnauthenticated?: boolean;
  /**
   * Called once the backup's copy is staged, right before it replaces the live store (the
   * tenant is blocked on this process meanwhile): progress reporting, and specs that write on
   * another replica at that moment.
   */
  onStaged?: () => Promise<void>;
}

export interface DeprovisionResult {
  tenant: string;
  region: string;
  /** Whether the provider held a tenant key that was destroyed. */
  tenantKeyDestroyed: boolean;
  /** DEK versions erased from the store before it was deleted. */
  dekVersionsDestroyed: number;
  storeDeleted: boolean;
}

export interface RegionStoresStats {
  region: string;
  dialect: 'sqlite' | 'postgres';
  open: number;
  maxOpen: number;
  runningJobs: number;
}

/** Options of `openRegionStores`. Exactly one of `dataDir` and `postgresUrl`. */
export interface OpenRegionStoresOptions {
  region: string;
  /** SQLite: stores at `<dataDir>/<region>/<tenant>.sqlite`. */
  dataDir?: string;
  /** PostgreSQL: one schema per tenant, `<schemaPrefix><tenant>`. */
  postgresUrl?: string;
  /** Default `cellcds_t_`. Lower-case letters, digits, `_`. */
  schemaPrefix?: string;
  keyProvider: KeyProvider;
  /**
   * May this process make the region's first keyring binding (`keyring-binding.ts`)? Default
   * true: the server. An operator command that opens a region outside the server (`cellcds
   * migrate`, `evidence`) passes false: a region no server opened yet is refused
   * (KeyUnavailableError `keyring_unbound`, "no keyring binding yet") before anything is bound.
   */
  mayBind?: boolean;
  /** Open store handles kept (LRU). Default 64. */
  maxOpen?: number;
  /** PostgreSQL connections per open store. Default 2. */
  pgPoolMax?: number;
  /**
   * PostgreSQL: the longest a statement may run (`statement_timeout`; the client also gives up
   * on a reply after this + 1 s, for a network that stopped answering). 0 = no limit.
   * Default 5000 ms.
   */
  pgStatementTimeoutMs?: number;
  /**
   * PostgreSQL: the longest a call waits for a pooled connection, including opening one (and
   * its place in the queue for one). Default 60000 ms (Sequelize's); the server passes
   * CELLCDS_PG_ACQUIRE_TIMEOUT_MS (5000): its calls have a budget of their own, batch jobs and
   * tools may queue more.
   */
  pgAcquireTimeoutMs?: number;
  now?: () => Date;
  rewrap?: {
    /** Records per batch (one transaction each) of an emergency rotation. Default 200. */
    batchSize?: number;
    /**
     * Records re-sealed per batch of a scheduled rotation; a re-wrapped head counts a quarter
     * (HEADS_PER_RESEAL), so a batch holds up to 4x as many heads. Default 50 (200 heads):
     * hook-path writes to the store wait while a batch is written (~0.2 ms per 30 KiB record
     * re-sealed, a fraction of that per head), so a scheduled rotation keeps its batches short;
     * an emergency one favours speed.
     */
    scheduledBatchSize?: number;
    /** Pause between batches of a scheduled rotation. Default 50 ms. */
    throttleMs?: number;
    /** Pause between batches of an emergency rotation. Default 0. */
    emergencyThrottleMs?: number;
  };
  /**
   * How long a running DEK job's lease holds without renewal (ms, 100..3600000; default
   * 60000). Every batch renews it, and a pause between batches longer than half of it renews
   * it in between; another replica takes the job over only after it expired.
   */
  jobLeaseMs?: number;
  /** Called when a background job fails (safe error). */
  onJobError?: (job: JobInfo, err: unknown) => void;
  /**
   * Called after each committed record write (an invocation record, or a feedback batch) with
   * the seconds from the store call to its durable commit (metrics). No tenant, no record: the
   * region is the caller's. Must be cheap and must not throw (a fault is ignored).
   */
  onRecordWrite?: (record: 'invocation' | 'feedback', seconds: number) => void;
  /**
   * Called when this process starts a job (`started`: a rotation asked here) or resumes one
   * (`resumed`: left running by a restart or crash here, or taken over from a replica whose
   * lease expired), with its progress then (`done` of `total`). A DEK job is reported resumed
   * once its first batch here holds the lease. Must not throw.
   */
  onJobStart?: (job: JobInfo, how: 'started' | 'resumed') => void;
  /**
   * Called once when a job this process ran stops: `done`, `failed` (with its safe `error`)
   * or `superseded` (a newer rotation of the tenant replaced it). Not called for a job
   * interrupted by `close()` (it stays `running` and resumes later). Must not throw.
   */
  onJobEnd?: (job: JobInfo) => void;
  /**
   * Wrap (AES-GCM invocation) limits of each DEK version (tenants/data-plane/wrap-limit.ts):
   * at `soft` (default 2^31) the primary is rotated automatically (scheduled, actor `system`,
   * reason `wrap_limit`); a write that would pass `hard` (default 2^32 - 2^20) is refused.
   */
  wrapLimits?: { soft?: number; hard?: number };
  /**
   * Called when a version reaches its soft limit (a rotation started, or failed to start and is
   * tried again by a later write after 30 s) and when a write is refused at the hard limit.
   * Tenant id, version, counts, job id, a safe error: no PHI. Must not throw.
   */
  onWrapLimit?: (event: WrapLimitEvent) => void;
  /**
   * Called when `resumePendingJobs` (or its retry) cannot read a tenant's jobs or start one
   * (`tenant` undefined: the list of stores itself). The scan goes on with the other tenants;
   * stores the database could not serve (a connection refused or timed out) are tried again
   * every `resumeRetryMs`.
   */
  onResumeError?: (tenant: string | undefined, err: unknown) => void;
  /** Pause before pending jobs whose store could not be reached are tried again. Default 30 s. */
  resumeRetryMs?: number;
  /**
   * Called at open with the staged restore copies (`.<tenant>.restore-<id>.sqlite`) that
   * restores killed before their commit left, and that were removed (file names: ids only).
   */
  onAbandonedRestores?: (files: string[]) => void;
}

/** All tenant stores of one region, a bounded LRU of open handles, jobs and lifecycle. */
export interface RegionStores {
  readonly region: string;
  /** This instance's job owner id (`hostname:pid:random`): the lease owner of jobs it runs. */
  readonly jobOwner: string;
  /** The tenant's store facade (opened lazily, per operation). @throws InvalidInputError. */
  store(tenantId: string): TenantStore;
  /**
   * Creates the tenant's store and keys now (also done lazily on first use). Re-creates keys for
   * a tenant that was deprovisioned. @throws InvalidInputError.
   */
  provisionTenant(tenantId: string): Promise<void>;
  /** Tenants with a store in this region. */
  listTenants(): Promise<string[]>;
  /**
   * A job by id (any tenant of this region, or a KEK job), or undefined. A running DEK job that
   * no live replica holds (no lease, or an expired one) is taken over and runs here; one that
   * another replica holds is watched.
   */
  findJob(id: string): Promise<JobInfo | undefined>;
  /** The tenant's jobs, newest first. */
  listJobs(tenantId: string): Promise<JobInfo[]>;
  /**
   * Resolves when the job stops running (done, failed, superseded), wherever it runs: a DEK job
   * another replica holds is watched (and taken over if its lease expires). Also resolves,
   * still `running`, if this process stops running it (closing, database unavailable).
   * @throws NotFoundError.
   */
  waitForJob(id: string): Promise<JobInfo>;
  /**
   * Restarts every job left running (crash, restart) and an unfinished KEK rotation. Opens one
   * store at a time and closes it again unless it has a pending job. Never rejects for one
   * tenant: a store that cannot be read is reported (`onResumeError`) and, if the database could
   * not serve it, tried again later. A DEK job whose lease another replica holds is watched,
   * not run: it is taken over when that lease expires without renewal.
   */
  resumePendingJobs(): Promise<JobInfo[]>;
  /**
   * Whether the region's storage answers: PostgreSQL `SELECT 1` on the region connection;
   * SQLite, a small file is created, fsynced and removed in the region's folder (a success is
   * trusted for 2 s). Never rejects; when down, `code` is short (e.g. `ENOSPC`, `EROFS`, a
   * driver error class) and `error` a message naming no host or path.
   */
  ping(): Promise<{ ok: boolean; error?: string; code?: string }>;
  /**
   * The jobs this process runs now (DEK rewraps and a KEK rewrap), without opening any other
   * store (for metrics: listing every tenant's jobs would open every store).
   */
  runningJobs(): Promise<JobInfo[]>;
  /** Rotates the region's KEK and starts the job that rewraps every tenant's DEKs. */
  rotateKek(opts?: { actor?: string }): Promise<JobInfo>;
  /**
   * Crypto-shreds the tenant (provider key first, then every DEK version), then deletes its
   * store (files incl. WAL/SHM, or the schema). @throws InvalidInputError.
   */
  deprovisionTenant(tenantId: string): Promise<DeprovisionResult>;
  /**
   * Writes a consistent snapshot (ciphertext as stored), its wrapped DEKs and a manifest with
   * sha256 checksums into a new folder under `backupDir`, the manifest authenticated by an
   * HMAC-SHA256 under a fresh key the provider wraps for the tenant (format 2).
   * @throws NotFoundError (no store), BackupError, KeyUnavailableError.
   */
  backupTenant(tenantId: string, backupDir: string): Promise<BackupResult>;
  /**
   * Validates a backup folder (its manifest's MAC first, before anything is staged) and
   * replaces that one tenant's store with it.
   * @throws BackupError (manifest, checksum, manifest_signature, unauthenticated,
   *   key_unavailable, wrong_region, wrong_tenant, wrong_dialect, snapshot, audit_chain,
   *   manifest_mismatch), KeyUnavailableError('provider').
   */
  restoreTenant(backupPath: string, opts?: RestoreOptions): Promise<RestoreResult>;
  stats(): RegionStoresStats;
  /**
   * Stops job runners after their current batch, releases their leases (another replica may
   * take the jobs over at once) and closes every handle.
   */
  close(): Promise<void>;
}
