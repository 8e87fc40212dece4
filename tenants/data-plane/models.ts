/**
 * Sequelize models of a tenant store, defined once per Sequelize instance by a factory. The
 * same models run on SQLite (one file per tenant) and PostgreSQL (one schema per tenant).
 * PHI lives only in the `sealed` columns (AES-256-GCM envelopes: BLOBs on SQLite, text on
 * PostgreSQL; see record-cipher.ts); every other column is metadata without PHI. JSON-valued columns are TEXT, parsed by the repositories.
 */
import { DataTypes } from 'sequelize';
import type { Model, ModelStatic, Sequelize } from 'sequelize';
import type { Envelope } from './record-cipher.ts';

/**
 * Bumped when the tables change; a store at this version skips `sync()` on open. 2: the head
 * tables (`invocation_heads`, `feedback_heads`), created by `sync()` in older stores. 3: the
 * job lease columns (`jobs.lease_owner`, `jobs.lease_until`), added to older stores by
 * `ALTER TABLE` (sync() creates missing tables only; see ADDED_COLUMNS). 4: the DEK wrap count
 * (`dek_versions.wrap_count`, wrap-limit.ts), added the same way and set to a lower bound from
 * the records and heads the store holds. 5: each card's own suggestion uuids
 * (`invocation_cards.suggestion_uuids`, and `invocations.card_suggestion_uuids`, which the SQLite
 * hook batch's link trigger reads them from), added the same way; NULL in rows written before.
 * 6: which rule of which pack version made each card, and the override reason codes it offered
 * (`invocation_cards.rule_id`, `pack_id`, `pack_version`, `override_codes`, from
 * `invocations.card_rules`), and the offered reason code an override named
 * (`feedback.reason_code`): pack metadata in clear for the override-rate report
 * (TenantStore.feedbackSummary); NULL in rows written before (rule "unknown", no reason code).
 */
export const STORE_SCHEMA_VERSION = '6';

export interface MetaRow {
  key: string;
  value: string;
}

export interface DekRow {
  version: number;
  status: string;
  wrapped: string | null;
  kekVersion: number | null;
  /** 0/1 (portable boolean). */
  compromised: number;
  createdAt: string;
  retiredAt: string | null;
  destroyedAt: string | null;
  /**
   * AES-GCM encryptions made under this version (record keys wrapped, legacy records sealed),
   * counted by the store's triggers in the writing statement (wrap-limit.ts). PostgreSQL's
   * driver returns a BIGINT as a string: read it with Number().
   */
  wrapCount: number | string;
}

export interface InvocationRow {
  seq: number;
  id: string;
  time: string;
  service: string;
  hook: string;
  hookInstance: string;
  packId: string;
  packVersion: string;
  packHash: string;
  cardUuids: string;
  suggestionUuids: string;
  /**
   * JSON: one array of suggestion uuids per card, in the order of `cardUuids` (schema 5). The
   * SQLite hook batch's link trigger copies each card's array into its link row from here.
   * Null: not known (a row written before schema 5, or by a caller that did not give them).
   */
  cardSuggestionUuids: string | null;
  /**
   * JSON: one `{ r: ruleId, o?: ["system|code", ...] }` per card, in the order of `cardUuids`
   * (schema 6): the rule that made the card and the override reason codes it offered, pack
   * metadata only. The SQLite hook batch's link trigger copies each into its link row. Null: not
   * known (a row written before schema 6, or by a caller that did not give them).
   */
  cardRules: string | null;
  keyVersion: number;
  sealed: Envelope;
  createdAt: string;
}

export interface InvocationCardRow {
  cardUuid: string;
  invocationId: string;
  /**
   * JSON array: the suggestion uuids of this card (schema 5), what feedback on it may accept.
   * Null: not known (a link written before schema 5): feedback on the card is checked against
   * its invocation's `suggestionUuids`, as before.
   */
  suggestionUuids: string | null;
  /** The pack's id of the rule that made the card (schema 6); null: not known (rule "unknown"). */
  ruleId: string | null;
  /** The pack and version that made the card (schema 6); null in links written before. */
  packId: string | null;
  packVersion: string | null;
  /**
   * JSON array of the override reason codes (`system|code`) the card offered (schema 6), copied
   * from the pack's card template (never interpolated): an override naming one of them is
   * counted under it. Null: none offered, or not known.
   */
  overrideCodes: string | null;
}

export interface FeedbackRow {
  seq: number;
  id: string;
  invocationId: string;
  cardUuid: string;
  service: string;
  outcome: string;
  receivedAt: string;
  /**
   * Schema 6: `system|code` of the override reason, only when it is one the card offered (its
   * link's `overrideCodes`: pack metadata). Null otherwise: accepted, no reason, free text only,
   * a code the card did not offer (which may be anything the EHR sent: it stays sealed only), or
   * a row written before schema 6.
   */
  reasonCode: string | null;
  keyVersion: number;
  sealed: Envelope;
}

/**
 * A record's current head, kept apart from the record (see rewrap-jobs.ts): a scheduled DEK
 * rotation re-wraps the record key in the head and writes it here, leaving the record's row
 * (and its ciphertext) untouched. When a head row exists, its `keyVersion` is the DEK version
 * the record is under, and its head replaces the one inside the record's envelope. Anything
 * that rewrites a record's `sealed` deletes the record's head row in the same transaction.
 */
export interface RecordHeadRow {
  /** The record's seq in its table. */
  seq: number;
  keyVersion: number;
  head: Envelope;
}

export interface AuditEventRow {
  seq: number;
  at: string;
  type: string;
  outcome: string;
  actor: string | null;
  detail: string | null;
  prevHash: string;
  hash: string;
}

export interface AuditHeadRow {
  id: number;
  seq: number;
  hash: string;
}

export interface JobRow {
  id: string;
  n: number;
  kind: string;
  status: string;
  /** 0/1. */
  emergency: number;
  /** JSON array of DEK versions being moved away from. */
  fromVersions: string;
  total: number;
  done: number;
  checkpointTable: string;
  checkpointSeq: number;
  startedAt: string;
  updatedAt: string;
  finishedAt: string | null;
  error: string | null;
  /**
   * The RegionStores instance running the job (`hostname:pid:random`, job-lease.ts), while it
   * runs; null when no one holds it (a job of an older version, released, or stopped).
   */
  leaseOwner: string | null;
  /** ISO instant (the database's clock) until which the owner holds the job, or null. */
  leaseUntil: string | null;
}

type Creation<T, Optional extends keyof T = never> = Omit<T, Optional> & Partial<Pick<T, Optional>>;

/**
 * A model instance that also exposes its attributes: the repositories query with `raw: true`,
 * which returns plain rows that Sequelize's types still call instances.
 */
export type RowModel<T extends object, C extends object = T> = Model<T, C> & T;

export interface TenantStoreModels {
  Meta: ModelStatic<RowModel<MetaRow>>;
  Dek: ModelStatic<RowModel<DekRow>>;
  Invocation: ModelStatic<RowModel<InvocationRow, Creation<InvocationRow, 'seq'>>>;
  InvocationCard: ModelStatic<RowModel<InvocationCardRow>>;
  Feedback: ModelStatic<RowModel<FeedbackRow, Creation<FeedbackRow, 'seq'>>>;
  InvocationHead: ModelStatic<RowModel<RecordHeadRow>>;
  FeedbackHead: ModelStatic<RowModel<RecordHeadRow>>;
  AuditEvent: ModelStatic<RowModel<AuditEventRow>>;
  AuditHead: ModelStatic<RowModel<AuditHeadRow>>;
  Job: ModelStatic<RowModel<JobRow>>;
}

/** The tables holding sealed records, in rewrap order. */
export const SEALED_TABLES = ['invocations', 'feedback'] as const;
export type SealedTable = (typeof SEALED_TABLES)[number];

/** Table names, for raw statements (triggers, backups). */
export const TABLES = {
  meta: 'meta',
  deks: 'dek_versions',
  invocations: 'invocations',
  invocationCards: 'invocation_cards',
  feedback: 'feedback',
  invocationHeads: 'invocation_heads',
  feedbackHeads: 'feedback_heads',
  auditEvents: 'audit_events',
  auditHead: 'audit_head',
  jobs: 'jobs',
  dekHistory: 'dek_history',
} as const;

/**
 * A row of `dek_history`: what the store has known of one DEK version (a key: its number and
 * `created_at`), kept across restores. A restore puts a copy of an older store in place, which
 * knows nothing of the versions made after it (nor of their counts or compromise); each restore
 * writes into the copy it puts in place the union of the live store's history, the live DEK rows
 * and the copy's own (highest count, compromised and destroyed sticky), and checks the copy's
 * keys against that union (backup.ts, reconcileDeks). Not a model: created by restores only, with
 * the same statement on both backends (DEK_HISTORY_COLUMNS); a store never restored has none.
 */
export interface DekHistoryRow {
  version: number;
  /** The version's `created_at`, compared as a string (its identity with `version`). */
  createdAt: string;
  /** The highest wrap count seen for the key. */
  wrapCount: number;
  /** 0/1: an emergency rotation marked it compromised. */
  compromised: number;
  /** 0/1: seen destroyed. */
  destroyed: number;
  destroyedAt: string | null;
}

/** The columns of `dek_history` (CREATE TABLE on SQLite and PostgreSQL alike). */
export const DEK_HISTORY_COLUMNS = `(
  version INTEGER NOT NULL,
  created_at VARCHAR(32) NOT NULL,
  wrap_count BIGINT NOT NULL DEFAULT 0,
  compromised INTEGER NOT NULL DEFAULT 0,
  destroyed INTEGER NOT NULL DEFAULT 0,
  destroyed_at VARCHAR(32),
  PRIMARY KEY (version, created_at))`;

/** The head table of each sealed table. */
export const HEAD_TABLES: Readonly<Record<SealedTable, string>> = {
  invocations: TABLES.invocationHeads,
  feedback: TABLES.feedbackHeads,
};

/**
 * Columns added to a table after it first shipped: opening an older store adds the missing ones
 * (`sync()` creates missing tables, never columns). Nullable, so rows written by older versions
 * (and older backups restored) stay valid. Schema 3: the job lease (job-lease.ts). Schema 4: the
 * DEK wrap count (not null, default 0). Schema 5: each card's suggestion uuids (null in older
 * rows: feedback on those cards is checked against the invocation's list, tenant-store.ts).
 * Schema 6: each card's rule and pack version, and an override's offered reason code.
 */
export const ADDED_COLUMNS: ReadonlyArray<{ table: string; column: string; type: string }> = [
  { table: TABLES.jobs, column: 'lease_owner', type: 'VARCHAR(200)' },
  { table: TABLES.jobs, column: 'lease_until', type: 'VARCHAR(32)' },
  // Schema 4: NOT NULL with a default, so existing rows read 0 until the upgrade sets them to
  // the lower bound the store can tell (store-backend.ts, WRAP_COUNT_FLOOR).
  { table: TABLES.deks, column: 'wrap_count', type: 'BIGINT NOT NULL DEFAULT 0' },
  // Schema 5: the suggestions of each card (JSON arrays, plaintext ids like `suggestion_uuids`).
  { table: TABLES.invocations, column: 'card_suggestion_uuids', type: 'TEXT' },
  { table: TABLES.invocationCards, column: 'suggestion_uuids', type: 'TEXT' },
  // Schema 6: the rule, pack version and offered override codes of each card, and the offered
  // code an override named (pack metadata, no PHI; null in older rows: rule "unknown").
  { table: TABLES.invocations, column: 'card_rules', type: 'TEXT' },
  { table: TABLES.invocationCards, column: 'rule_id', type: 'VARCHAR(128)' },
  { table: TABLES.invocationCards, column: 'pack_id', type: 'VARCHAR(128)' },
  { table: TABLES.invocationCards, column: 'pack_version', type: 'VARCHAR(64)' },
  { table: TABLES.invocationCards, column: 'override_codes', type: 'TEXT' },
  { table: TABLES.feedback, column: 'reason_code', type: 'TEXT' },
];

/**
 * Defines the tenant-store models on `sequelize` (call once per instance). `schema` places the
 * tables in a PostgreSQL schema; SQLite passes undefined.
 */
export function defineTenantStoreModels(sequelize: Sequelize, schema?: string): TenantStoreModels {
  const common = {
    timestamps: false,
    underscored: true,
    freezeTableName: true,
    ...(schema !== undefined ? { schema } : {}),
  } as const;
  const ts = () => ({ type: DataTypes.STRING(32), allowNull: false });
  const tsNull = () => ({ type: DataTypes.STRING(32), allowNull: true });

  const Meta = sequelize.define<RowModel<MetaRow>>(
    'Meta',
    {
      key: { type: DataTypes.STRING(64), primaryKey: true },
      value: { type: DataTypes.TEXT, allowNull: false },
    },
    { ...common, tableName: TABLES.meta },
  );
  const Dek = sequelize.define<RowModel<DekRow>>(
    'Dek',
    {
      version: { type: DataTypes.INTEGER, primaryKey: true },
      status: { type: DataTypes.STRING(16), allowNull: false },
      wrapped: { type: DataTypes.TEXT, allowNull: true },
      kekVersion: { type: DataTypes.INTEGER, allowNull: true },
      compromised: { type: DataTypes.INTEGER, allowNull: false, defaultValue: 0 },
      createdAt: ts(),
      retiredAt: tsNull(),
      destroyedAt: tsNull(),
      wrapCount: { type: DataTypes.BIGINT, allowNull: false, defaultValue: 0 },
    },
    { ...common, tableName: TABLES.deks },
  );
  const Invocation = sequelize.define<RowModel<InvocationRow, Creation<InvocationRow, 'seq'>>>(
    'Invocation',
    {
      seq: { type: DataTypes.INTEGER, primaryKey: true, autoIncrement: true },
      id: { type: DataTypes.STRING(128), allowNull: false, unique: true },
      time: ts(),
      service: { type: DataTypes.STRING(128), allowNull: false },
      hook: { type: DataTypes.STRING(64), allowNull: false },
      hookInstance: { type: DataTypes.STRING(256), allowNull: false },
      packId: { type: DataTypes.STRING(128), allowNull: false },
      packVersion: { type: DataTypes.STRING(64), allowNull: false },
      packHash: { type: DataTypes.STRING(128), allowNull: false },
      cardUuids: { type: DataTypes.TEXT, allowNull: false },
      suggestionUuids: { type: DataTypes.TEXT, allowNull: false },
      cardSuggestionUuids: { type: DataTypes.TEXT, allowNull: true },
      cardRules: { type: DataTypes.TEXT, allowNull: true },
      keyVersion: { type: DataTypes.INTEGER, allowNull: false },
      // Declared TEXT on both backends; SQLite keeps a BLOB bound here as a BLOB (TEXT affinity
      // converts numbers, never blobs), so binary envelopes need no schema change there.
      sealed: { type: DataTypes.TEXT, allowNull: false },
      createdAt: ts(),
    },
    {
      ...common,
      tableName: TABLES.invocations,
      indexes: [{ fields: ['time'] }, { fields: ['hook', 'time'] }, { fields: ['key_version'] }],
    },
  );
  const InvocationCard = sequelize.define<RowModel<InvocationCardRow>>(
    'InvocationCard',
    {
      cardUuid: { type: DataTypes.STRING(128), primaryKey: true },
      invocationId: { type: DataTypes.STRING(128), allowNull: false },
      suggestionUuids: { type: DataTypes.TEXT, allowNull: true },
      ruleId: { type: DataTypes.STRING(128), allowNull: true },
      packId: { type: DataTypes.STRING(128), allowNull: true },
      packVersion: { type: DataTypes.STRING(64), allowNull: true },
      overrideCodes: { type: DataTypes.TEXT, allowNull: true },
    },
    { ...common, tableName: TABLES.invocationCards, indexes: [{ fields: ['invocation_id'] }] },
  );
  const Feedback = sequelize.define<RowModel<FeedbackRow, Creation<FeedbackRow, 'seq'>>>(
    'Feedback',
    {
      seq: { type: DataTypes.INTEGER, primaryKey: true, autoIncrement: true },
      id: { type: DataTypes.STRING(64), allowNull: false, unique: true },
      invocationId: { type: DataTypes.STRING(128), allowNull: false },
      cardUuid: { type: DataTypes.STRING(128), allowNull: false },
      service: { type: DataTypes.STRING(128), allowNull: false },
      outcome: { type: DataTypes.STRING(16), allowNull: false },
      receivedAt: ts(),
      reasonCode: { type: DataTypes.TEXT, allowNull: true },
      keyVersion: { type: DataTypes.INTEGER, allowNull: false },
      sealed: { type: DataTypes.TEXT, allowNull: false },
    },
    {
      ...common,
      tableName: TABLES.feedback,
      indexes: [{ fields: ['invocation_id'] }, { fields: ['key_version'] }],
    },
  );
  const headModel = (name: string, tableName: string) =>
    sequelize.define<RowModel<RecordHeadRow>>(
      name,
      {
        seq: { type: DataTypes.INTEGER, primaryKey: true, autoIncrement: false },
        keyVersion: { type: DataTypes.INTEGER, allowNull: false },
        // TEXT like `sealed`: a BLOB on SQLite, the text form on PostgreSQL.
        head: { type: DataTypes.TEXT, allowNull: false },
      },
      { ...common, tableName, indexes: [{ fields: ['key_version'] }] },
    );
  const InvocationHead = headModel('InvocationHead', TABLES.invocationHeads);
  const FeedbackHead = headModel('FeedbackHead', TABLES.feedbackHeads);
  const AuditEvent = sequelize.define<RowModel<AuditEventRow>>(
    'AuditEvent',
    {
      seq: { type: DataTypes.INTEGER, primaryKey: true, autoIncrement: false },
      at: ts(),
      type: { type: DataTypes.STRING(100), allowNull: false },
      outcome: { type: DataTypes.STRING(16), allowNull: false },
      actor: { type: DataTypes.STRING(200), allowNull: true },
      detail: { type: DataTypes.TEXT, allowNull: true },
      prevHash: { type: DataTypes.STRING(64), allowNull: false },
      hash: { type: DataTypes.STRING(64), allowNull: false },
    },
    { ...common, tableName: TABLES.auditEvents },
  );
  const AuditHead = sequelize.define<RowModel<AuditHeadRow>>(
    'AuditHead',
    {
      id: { type: DataTypes.INTEGER, primaryKey: true, autoIncrement: false },
      seq: { type: DataTypes.INTEGER, allowNull: false },
      hash: { type: DataTypes.STRING(64), allowNull: false },
    },
    { ...common, tableName: TABLES.auditHead },
  );
  const Job = sequelize.define<RowModel<JobRow>>(
    'Job',
    {
      id: { type: DataTypes.STRING(100), primaryKey: true },
      n: { type: DataTypes.INTEGER, allowNull: false, unique: true },
      kind: { type: DataTypes.STRING(16), allowNull: false },
      status: { type: DataTypes.STRING(16), allowNull: false },
      emergency: { type: DataTypes.INTEGER, allowNull: false },
      fromVersions: { type: DataTypes.TEXT, allowNull: false },
      total: { type: DataTypes.INTEGER, allowNull: false },
      done: { type: DataTypes.INTEGER, allowNull: false },
      checkpointTable: { type: DataTypes.STRING(32), allowNull: false },
      checkpointSeq: { type: DataTypes.INTEGER, allowNull: false },
      startedAt: ts(),
      updatedAt: ts(),
      finishedAt: tsNull(),
      error: { type: DataTypes.STRING(500), allowNull: true },
      leaseOwner: { type: DataTypes.STRING(200), allowNull: true },
      leaseUntil: tsNull(),
    },
    { ...common, tableName: TABLES.jobs, indexes: [{ fields: ['status'] }] },
  );
  return {
    Meta,
    Dek,
    Invocation,
    InvocationCard,
    Feedback,
    InvocationHead,
    FeedbackHead,
    AuditEvent,
    AuditHead,
    Job,
  };
}
