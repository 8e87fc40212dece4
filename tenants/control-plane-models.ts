/**
 * Sequelize models of the control plane, defined once per Sequelize instance by a factory.
 * Rows hold no PHI: tenant registrations, the pack catalog, admin token hashes, audit events.
 * JSON-valued columns are TEXT parsed by the repositories (explicit, portable to PostgreSQL).
 * The same models run on SQLite (one file) and PostgreSQL (one schema; control-plane-postgres.ts).
 */
import { DataTypes } from 'sequelize';
import type { DataType, Model, ModelStatic, Sequelize, Transaction } from 'sequelize';

/**
 * Runs `fn` in a write transaction, after this process's other writes: SQLite IMMEDIATE (one
 * writer), PostgreSQL holding the control plane's advisory lock (one writer across replicas).
 */
export type WriteTx = <T>(fn: (t: Transaction) => Promise<T>) => Promise<T>;

/** Runs a single-statement write after this process's other writes. */
export type WriteLock = <T>(fn: () => Promise<T>) => Promise<T>;

export interface TenantRow {
  id: string;
  name: string;
  region: string;
  status: string;
  issuers: string;
  fhirServers: string;
  subscriptions: string;
  /** JSON of the registered ResidencyPolicyInput, or null for the default policy. */
  residency: string | null;
  /** JSON of the ActiveFailover, or null. */
  failover: string | null;
  /** JSON of the TenantSmart registration, or null (the deployment's default client id). */
  smart: string | null;
  /** JSON of the TenantRetention, or null (records kept forever). */
  retention: string | null;
  createdAt: string;
  updatedAt: string;
}

/**
 * A tenant id that was deprovisioned (crypto-shredded) and left the registry: ids are never
 * reused, so its audit history and any shredded data stay unambiguously its own.
 */
export interface RetiredTenantRow {
  id: string;
  /** ISO 8601 instant the registry entry was removed. */
  retiredAt: string;
}

/** Index of `iss` -> tenant, so token verification finds candidate tenants with one lookup. */
export interface TenantIssuerRow {
  iss: string;
  tenantId: string;
}

export interface PackRow {
  id: string;
  version: string;
  hash: string;
  pack: string;
  uploadedAt: string;
  uploadedBy: string | null;
}

export interface AdminTokenRow {
  id: string;
  role: string;
  tenantId: string | null;
  label: string | null;
  tokenHash: string;
  createdAt: string;
  revokedAt: string | null;
  /** The id of the token that issued this one; null for the bootstrap operator and the CLI. */
  issuedBy: string | null;
  /** When it stops authenticating; null: never (rows written before expiries existed). */
  expiresAt: string | null;
  /**
   * When it last authenticated (written at most once per ADMIN_TOKEN_USE_INTERVAL_MS, so up to
   * that much earlier than the true last use); null: no use recorded (never used, or not since
   * the column was added).
   */
  lastUsedAt: string | null;
}

export interface AuditRow {
  seq: number;
  at: string;
  type: string;
  outcome: string;
  tenant: string | null;
  actor: string | null;
  detail: string | null;
  /** Hash chain: the previous event's hash, and sha256(prevHash || canonical {seq, event}). */
  prevHash: string;
  hash: string;
}

/** The chain's head, kept outside the chain so that deleting the last events is detected. */
export interface AuditHeadRow {
  id: number;
  seq: number;
  hash: string;
}

type Creation<T, Optional extends keyof T = never> = Omit<T, Optional> & Partial<Pick<T, Optional>>;

export interface ControlPlaneModels {
  Tenant: ModelStatic<Model<TenantRow, TenantRow>>;
  TenantIssuer: ModelStatic<Model<TenantIssuerRow, TenantIssuerRow>>;
  Pack: ModelStatic<Model<PackRow, PackRow>>;
  AdminToken: ModelStatic<Model<AdminTokenRow, AdminTokenRow>>;
  Audit: ModelStatic<Model<AuditRow, Creation<AuditRow, 'seq'>>>;
  AuditHead: ModelStatic<Model<AuditHeadRow, AuditHeadRow>>;
  RetiredTenant: ModelStatic<Model<RetiredTenantRow, RetiredTenantRow>>;
}

/**
 * Defines the control-plane models on `sequelize` (call once per instance). `schema` places the
 * tables in a PostgreSQL schema; SQLite passes undefined.
 */
export function defineControlPlaneModels(
  sequelize: Sequelize,
  schema?: string,
): ControlPlaneModels {
  const common = {
    timestamps: false,
    underscored: true,
    freezeTableName: true,
    ...(schema !== undefined ? { schema } : {}),
  } as const;
  // Keys and instants compare and sort byte-wise, as SQLite's BINARY collation does: on
  // PostgreSQL the database's collation (say en_US) would order `a-c` after `ab` and make
  // list orders and `at` ranges depend on how the server was initialised.
  const isPostgres = sequelize.getDialect() === 'postgres';
  const key = (n: number) =>
    isPostgres ? `VARCHAR(${String(n)}) COLLATE "C"` : DataTypes.STRING(n);
  /**
   * Adds the nullable columns a table created by an older version lacks (`sync()` creates
   * tables, never columns): their rows keep working, the new fields unset. PostgreSQL runs this
   * in the setup transaction, under its advisory lock (control-plane-postgres.ts passes it to
   * sync). Two SQLite processes opening one old file at once (a server starting while a
   * `cellcds` command runs) both find a column missing: the one whose ALTER comes second finds
   * it added by the other, and goes on.
   */
  const addMissingColumns = async (
    tableName: string,
    columns: ReadonlyArray<readonly [string, DataType | string]>,
    options: unknown,
  ): Promise<void> => {
    const qi = sequelize.getQueryInterface();
    const transaction = (options as { transaction?: Transaction | null }).transaction ?? undefined;
    const table = schema !== undefined ? { tableName, schema } : tableName;
    const describe = () =>
      qi.describeTable(tableName, {
        ...(schema !== undefined ? { schema } : {}),
        ...(transaction ? { transaction } : {}),
      });
    const have = await describe();
    for (const [column, type] of columns) {
      if (Object.hasOwn(have, column)) {
        continue;
      }
      try {
        await qi.addColumn(
          table,
          column,
          { type, allowNull: true },
          transaction ? { transaction } : {},
        );
      } catch (err) {
        if (transaction || !Object.hasOwn(await describe(), column)) {
          throw err;
        }
      }
    }
  };
  const Tenant = sequelize.define<Model<TenantRow, TenantRow>>(
    'Tenant',
    {
      id: { type: key(63), primaryKey: true },
      name: { type: DataTypes.STRING(200), allowNull: false },
      region: { type: DataTypes.STRING(63), allowNull: false },
      status: { type: DataTypes.STRING(16), allowNull: false },
      issuers: { type: DataTypes.TEXT, allowNull: false },
      fhirServers: { type: DataTypes.TEXT, allowNull: false },
      subscriptions: { type: DataTypes.TEXT, allowNull: false },
      residency: { type: DataTypes.TEXT, allowNull: true },
      failover: { type: DataTypes.TEXT, allowNull: true },
      smart: { type: DataTypes.TEXT, allowNull: true },
      retention: { type: DataTypes.TEXT, allowNull: true },
      createdAt: { type: key(32), allowNull: false },
      updatedAt: { type: key(32), allowNull: false },
    },
    { ...common, tableName: 'tenants' },
  );
  // `sync()` creates missing tables but never alters existing ones: a control plane created
  // before issue 5 gets the residency columns here, and one created before per-tenant SMART
  // client ids gets `smart` (nullable, so old rows mean "default"). PostgreSQL control planes
  // came after issue 5 but before `smart`; their sync runs in the setup transaction (under its
  // advisory lock), so the check and the ALTER run in it too.
  Tenant.addHook('afterSync', async (options) => {
    // `retention` (per-tenant retention periods) came later on both: null, kept forever.
    await addMissingColumns(
      'tenants',
      (isPostgres ? ['smart', 'retention'] : ['residency', 'failover', 'smart', 'retention']).map(
        (column) => [column, DataTypes.TEXT],
      ),
      options,
    );
  });
  const TenantIssuer = sequelize.define<Model<TenantIssuerRow, TenantIssuerRow>>(
    'TenantIssuer',
    {
      iss: { type: key(2048), primaryKey: true },
      tenantId: {
        type: key(63),
        primaryKey: true,
        references: { model: 'tenants', key: 'id' },
        onDelete: 'CASCADE',
      },
    },
    { ...common, tableName: 'tenant_issuers' },
  );
  const Pack = sequelize.define<Model<PackRow, PackRow>>(
    'Pack',
    {
      id: { type: key(128), primaryKey: true },
      version: { type: key(64), primaryKey: true },
      hash: { type: DataTypes.STRING(64), allowNull: false },
      pack: { type: DataTypes.TEXT, allowNull: false },
      uploadedAt: { type: key(32), allowNull: false },
      uploadedBy: { type: DataTypes.STRING(200), allowNull: true },
    },
    { ...common, tableName: 'packs' },
  );
  const AdminToken = sequelize.define<Model<AdminTokenRow, AdminTokenRow>>(
    'AdminToken',
    {
      id: { type: key(64), primaryKey: true },
      role: { type: DataTypes.STRING(32), allowNull: false },
      tenantId: { type: key(63), allowNull: true },
      label: { type: DataTypes.STRING(200), allowNull: true },
      tokenHash: { type: DataTypes.STRING(64), allowNull: false, unique: true },
      createdAt: { type: key(32), allowNull: false },
      revokedAt: { type: DataTypes.STRING(32), allowNull: true },
      issuedBy: { type: key(64), allowNull: true },
      expiresAt: { type: key(32), allowNull: true },
      lastUsedAt: { type: key(32), allowNull: true },
    },
    { ...common, tableName: 'admin_tokens' },
  );
  // Control planes (SQLite and PostgreSQL alike) created before token issuers and expiries get
  // the two columns here, nullable: their tokens keep working, issued by nobody known, expiring
  // never, until revoked. Those created before `last_used_at` get it the same way: null, no use
  // recorded yet. As for `tenants` above, PostgreSQL runs this in the setup transaction.
  AdminToken.addHook('afterSync', async (options) => {
    await addMissingColumns(
      'admin_tokens',
      [
        ['issued_by', key(64)],
        ['expires_at', key(32)],
        ['last_used_at', key(32)],
      ],
      options,
    );
  });
  const Audit = sequelize.define<Model<AuditRow, Creation<AuditRow, 'seq'>>>(
    'Audit',
    {
      seq: { type: DataTypes.INTEGER, primaryKey: true, autoIncrement: true },
      at: { type: key(32), allowNull: false },
      type: { type: DataTypes.STRING(100), allowNull: false },
      outcome: { type: DataTypes.STRING(16), allowNull: false },
      tenant: { type: key(63), allowNull: true },
      actor: { type: DataTypes.STRING(200), allowNull: true },
      detail: { type: DataTypes.TEXT, allowNull: true },
      prevHash: { type: DataTypes.STRING(64), allowNull: false },
      hash: { type: DataTypes.STRING(64), allowNull: false },
    },
    { ...common, tableName: 'audit_events', indexes: [{ fields: ['at'] }, { fields: ['tenant'] }] },
  );
  const AuditHead = sequelize.define<Model<AuditHeadRow, AuditHeadRow>>(
    'AuditHead',
    {
      id: { type: DataTypes.INTEGER, primaryKey: true },
      seq: { type: DataTypes.INTEGER, allowNull: false },
      hash: { type: DataTypes.STRING(64), allowNull: false },
    },
    { ...common, tableName: 'audit_head' },
  );
  // Written in the transaction that removes a deprovisioned tenant's registry entry; `sync()`
  // creates it on control planes (SQLite and PostgreSQL alike) made before it existed.
  const RetiredTenant = sequelize.define<Model<RetiredTenantRow, RetiredTenantRow>>(
    'RetiredTenant',
    {
      id: { type: key(63), primaryKey: true },
      retiredAt: { type: key(32), allowNull: false },
    },
    { ...common, tableName: 'retired_tenants' },
  );
  return { Tenant, TenantIssuer, Pack, AdminToken, Audit, AuditHead, RetiredTenant };
}
