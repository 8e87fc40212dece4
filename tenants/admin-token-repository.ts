/**
 * Admin bearer tokens. A token is `ccds_` + 32 random bytes (base64url); only its sha256 is
 * stored, and it is returned once, by `issue`. `authenticate` looks the hash up and confirms it
 * with a timing-safe comparison; revoked and expired tokens authenticate as nobody.
 *
 * Lifetimes: every token is issued with an expiry (`expiresInDays`, whole days from 1 to 365,
 * default 90), never later than the expiry of the token that issued it. Each token records who
 * issued it (`issuedBy`: the issuing token's id; null for the bootstrap operator, the local CLI
 * and rows written before issuers were recorded), and revoking a token revokes, in the same
 * transaction, every live token it issued and theirs. Rows written before expiries existed have
 * none (null: never expires) until they are revoked.
 *
 * Last use: a successful authentication records its time (`lastUsedAt`), so an operator can
 * tell stale tokens from those in use. It is written after the answer, never awaited by it (a
 * failed write is reported through `onUseNotRecorded` and the request is served all the same),
 * at most once per ADMIN_TOKEN_USE_INTERVAL_MS per token, and only forward: a replica whose
 * write comes after another's later one leaves the later one. A refused token records nothing.
 */
import crypto from 'node:crypto';
import { Op } from 'sequelize';
import type { Transaction } from 'sequelize';
import type { AdminTokenRow, ControlPlaneModels, WriteTx } from './control-plane-models.ts';
import { AdminAuthError, ConflictError, InvalidInputError, NotFoundError } from './errors.ts';
import type {
  AdminTokenInfo,
  IssuedAdminToken,
  NewAdminToken,
  Principal,
  RevokedAdminToken,
  Role,
} from './types.ts';

/** Every admin token starts with this, so secret scanners and humans recognise it. */
export const ADMIN_TOKEN_PREFIX = 'ccds_';
const TOKEN_PATTERN = /^ccds_[A-Za-z0-9_-]{43}$/;
/** The ids `issue` gives (`tok_` + 12 random bytes, hex). */
const TOKEN_ID_PATTERN = /^tok_[0-9a-f]{24}$/;
const ROLES: readonly Role[] = ['platform-operator', 'tenant-admin', 'rule-author', 'auditor'];
const TENANT_ROLES: readonly Role[] = ['tenant-admin', 'auditor'];
/** A token's lifetime when the request names none, in days. */
export const ADMIN_TOKEN_DEFAULT_DAYS = 90;
/** The longest lifetime a token may be issued with, in days. */
export const ADMIN_TOKEN_MAX_DAYS = 365;
const DAY_MS = 24 * 60 * 60 * 1000;

/**
 * The least time between two writes of one token's `lastUsedAt`: a use within this long of the
 * recorded one (read with the token's row, so another replica's write counts) or of this
 * process's last attempt writes nothing. A busy operator script thus costs one control-plane
 * write per token per 5 minutes, not one per request, and `lastUsedAt` is up to 5 minutes
 * earlier than the true last use: enough to tell a token in use from one unused for days.
 */
export const ADMIN_TOKEN_USE_INTERVAL_MS = 5 * 60 * 1000;

/**
 * `issue`'s input as this repository reads it: tenants/types.ts's NewAdminToken plus the
 * lifetime fields (checked here, since callers pass the request's values through).
 */
export interface NewAdminTokenInput extends NewAdminToken {
  /** Whole days, 1 to 365; default 90. Capped at the issuing token's own expiry. */
  expiresInDays?: unknown;
  /**
   * The issuing principal's token id. Stored when it names an issued token, which must then be
   * live (else AdminAuthError: revoked or expired meanwhile); any other id (`bootstrap`, `cli`)
   * is stored as null.
   */
  issuedBy?: string;
}

/** `issue`'s result: the token (shown once), its id and its expiry. */
export interface IssuedAdminTokenWithExpiry extends IssuedAdminToken {
  expiresAt: string;
}

/**
 * A listed token with its lifetime: `issuedBy` absent for the bootstrap/CLI, `expiresAt` for
 * none, `lastUsedAt` for no use recorded.
 */
export interface AdminTokenInfoWithLifetime extends AdminTokenInfo {
  issuedBy?: string;
  expiresAt?: string;
  lastUsedAt?: string;
}

/**
 * Why `check` refused a token (audited, never told to the caller): `revoked` and `expired` only
 * when the token's hash matched a stored row, whose id `tokenId` is.
 */
export type AdminTokenRefusal =
  { reason: 'unknown'; tokenId?: undefined } | { reason: 'revoked' | 'expired'; tokenId: string };

/** The outcome of `check`: the principal, or why there is none. */
export type AdminTokenCheck = { principal: Principal } | { refused: AdminTokenRefusal };

/** sha256 (hex) of an admin token: what the control plane stores. */
export function hashAdminToken(token: string): string {
  return crypto.createHash('sha256').update(token, 'utf8').digest('hex');
}

/** Whether a token row has expired at `now` (ISO instants of one format compare as strings). */
function isExpired(row: Pick<AdminTokenRow, 'expiresAt'>, now: string): boolean {
  return row.expiresAt !== null && row.expiresAt <= now;
}

function toInfo(row: AdminTokenRow): AdminTokenInfoWithLifetime {
  return {
    id: row.id,
    role: row.role as Role,
    ...(row.tenantId !== null ? { tenant: row.tenantId } : {}),
    ...(row.label !== null ? { label: row.label } : {}),
    createdAt: row.createdAt,
    ...(row.issuedBy !== null ? { issuedBy: row.issuedBy } : {}),
    ...(row.expiresAt !== null ? { expiresAt: row.expiresAt } : {}),
    ...(row.revokedAt !== null ? { revokedAt: row.revokedAt } : {}),
    ...(row.lastUsedAt !== null ? { lastUsedAt: row.lastUsedAt } : {}),
  };
}

/** Checks `expiresInDays` (absent: the default) and returns it. */
function lifetimeDays(value: unknown): number {
  if (value === undefined) {
    return ADMIN_TOKEN_DEFAULT_DAYS;
  }
  if (
    typeof value !== 'number' ||
    !Number.isInteger(value) ||
    value < 1 ||
    value > ADMIN_TOKEN_MAX_DAYS
  ) {
    throw new InvalidInputError(
      'expiresInDays',
      `must be a whole number of days from 1 to ${String(ADMIN_TOKEN_MAX_DAYS)}`,
    );
  }
  return value;
}

export interface AdminTokenRepositoryDeps {
  models: ControlPlaneModels;
  now: () => Date;
  writeTx: WriteTx;
  /** Whether the tenant exists, read in the write transaction `t`. */
  tenantExists: (id: string, t: Transaction) => Promise<boolean>;
  /** Live (not revoked, not expired) tokens one tenant may hold. Default 1000. */
  maxLiveTokensPerTenant?: number;
  /**
   * Told when a `lastUsedAt` write failed (the request it rode on was served): the token's id
   * and the error, never the token. Must not throw (what it throws is dropped). Default: a
   * process warning (`CellcdsWarning`, code `CELLCDS_TOKEN_USE_NOT_RECORDED`).
   */
  onUseNotRecorded?: (tokenId: string, err: unknown) => void;
}

/**
 * The default of `onUseNotRecorded`: a process warning naming the token's id and the error (the
 * driver's own message when Sequelize wrapped it: its "Validation error" says nothing).
 */
function warnUseNotRecorded(tokenId: string, err: unknown): void {
  const parent = (err as { parent?: unknown } | null)?.parent;
  const cause = parent instanceof Error ? parent : err;
  const message = cause instanceof Error ? cause.message : String(cause);
  process.emitWarning(`admin token ${tokenId}: last use not recorded: ${message}`, {
    type: 'CellcdsWarning',
    code: 'CELLCDS_TOKEN_USE_NOT_RECORDED',
  });
}

/**
 * Live tokens per tenant (tenant-admin and auditor): a tenant-admin issues auditor tokens, and
 * each is a principal of its own (an unbounded number would also unbound what is keyed by actor).
 */
export const MAX_LIVE_TOKENS_PER_TENANT = 1000;

/** What `createAdminTokenRepository` gives: tenants/types.ts's AdminTokenRepository, and more. */
export interface AdminTokenStore {
  /**
   * Issues a token. The issuer (`issuedBy`, when it names an issued token) is re-read in the
   * write transaction: a token revoked or expired since it authenticated issues nothing, so no
   * live token is ever left behind by a revocation.
   * @throws InvalidInputError (role, tenant, label, expiresInDays); AdminAuthError (401) for a
   *   revoked, expired or unknown issuer.
   */
  issue(input: NewAdminTokenInput): Promise<IssuedAdminTokenWithExpiry>;
  /** The principal of a live token, else undefined (unknown, revoked or expired alike). */
  authenticate(token: string): Promise<Principal | undefined>;
  /** As `authenticate`, saying why a token was refused (for the audit trail, never the caller). */
  check(token: string): Promise<AdminTokenCheck>;
  /**
   * Revokes the token and, in the same transaction, every live token it issued, transitively.
   * @throws NotFoundError for an unknown id.
   */
  revoke(id: string): Promise<RevokedAdminToken[]>;
  list(): Promise<AdminTokenInfoWithLifetime[]>;
  revokeForTenant(tenantId: string, t: Transaction): Promise<void>;
  /**
   * Resolves once every `lastUsedAt` write started so far has ended (written, or reported to
   * `onUseNotRecorded`); for a close that lets them finish, and for tests. Never rejects.
   */
  settled(): Promise<void>;
}

/** Creates the admin token repository. */
export function createAdminTokenRepository(deps: AdminTokenRepositoryDeps): AdminTokenStore {
  const { AdminToken } = deps.models;
  const onUseNotRecorded = deps.onUseNotRecorded ?? warnUseNotRecorded;
  /** Token id -> when (ms, by `deps.now`) this process last started writing its `lastUsedAt`. */
  const attempts = new Map<string, number>();
  /** `attempts` is swept of entries past the interval when it grows to this size. */
  let sweepAt = 1024;
  const writing = new Set<Promise<void>>();

  /**
   * Records a use of the token of `row` at `at`, after the caller's answer and without it
   * waiting: skipped when the row already holds a use within the interval or this process
   * started a write for it within the interval (a burst of requests, or a failing database:
   * one write, one warning, per interval). The UPDATE keeps a later value (max(old, new)).
   */
  const recordUse = (row: AdminTokenRow, at: Date): void => {
    const ms = at.getTime();
    const since = ms - ADMIN_TOKEN_USE_INTERVAL_MS;
    if (row.lastUsedAt !== null && Date.parse(row.lastUsedAt) > since) {
      return;
    }
    const attempted = attempts.get(row.id);
    if (attempted !== undefined && attempted > since) {
      return;
    }
    attempts.set(row.id, ms);
    if (attempts.size >= sweepAt) {
      for (const [id, started] of attempts) {
        if (started <= since) {
          attempts.delete(id);
        }
      }
      sweepAt = Math.max(1024, 2 * attempts.size);
    }
    const iso = at.toISOString();
    const write = deps
      .writeTx((t) =>
        AdminToken.update(
          { lastUsedAt: iso },
          {
            where: {
              id: row.id,
              [Op.or]: [{ lastUsedAt: { [Op.is]: null } }, { lastUsedAt: { [Op.lt]: iso } }],
            },
            transaction: t,
          },
        ),
      )
      .then(
        () => undefined,
        (err: unknown) => {
          try {
            onUseNotRecorded(row.id, err);
          } catch {
            // A failing report must not become an unhandled rejection (which ends the process).
          }
        },
      )
      .finally(() => {
        writing.delete(write);
      });
    writing.add(write);
  };

  const check = async (token: string): Promise<AdminTokenCheck> => {
    if (typeof token !== 'string' || !TOKEN_PATTERN.test(token)) {
      return { refused: { reason: 'unknown' } };
    }
    const hash = hashAdminToken(token);
    const row = (await AdminToken.findOne({
      where: { tokenHash: hash },
      raw: true,
    })) as unknown as AdminTokenRow | null;
    if (!row) {
      return { refused: { reason: 'unknown' } };
    }
    // The lookup is by hash; confirm in constant time so no comparison here leaks timing.
    const stored = Buffer.from(row.tokenHash, 'hex');
    const given = Buffer.from(hash, 'hex');
    if (stored.length !== given.length || !crypto.timingSafeEqual(stored, given)) {
      return { refused: { reason: 'unknown' } };
    }
    if (row.revokedAt !== null) {
      return { refused: { reason: 'revoked', tokenId: row.id } };
    }
    const now = deps.now();
    if (isExpired(row, now.toISOString())) {
      return { refused: { reason: 'expired', tokenId: row.id } };
    }
    recordUse(row, now);
    const principal: Principal = { tokenId: row.id, role: row.role as Role };
    if (row.tenantId !== null) {
      principal.tenant = row.tenantId;
    }
    return { principal };
  };

  return {
    async issue(input) {
      const raw = input as unknown as Record<string, unknown>;
      const role = raw.role;
      if (typeof role !== 'string' || !(ROLES as readonly string[]).includes(role)) {
        throw new InvalidInputError('role', `must be one of ${ROLES.join(', ')}`);
      }
      const tenant = raw.tenant;
      const isTenantRole = (TENANT_ROLES as readonly string[]).includes(role);
      const refuseTenant = () =>
        new InvalidInputError('tenant', `is required for ${role} and must be an existing tenant`);
      if (isTenantRole) {
        if (typeof tenant !== 'string') {
          throw refuseTenant();
        }
      } else if (tenant !== undefined) {
        throw new InvalidInputError('tenant', `must not be set for ${role}`);
      }
      const label = raw.label;
      if (label !== undefined && (typeof label !== 'string' || label.length > 200)) {
        throw new InvalidInputError('label', 'must be a string of at most 200 characters');
      }
      const days = lifetimeDays(raw.expiresInDays);
      const issuedBy =
        typeof raw.issuedBy === 'string' && TOKEN_ID_PATTERN.test(raw.issuedBy)
          ? raw.issuedBy
          : null;
      const token = ADMIN_TOKEN_PREFIX + crypto.randomBytes(32).toString('base64url');
      const id = `tok_${crypto.randomBytes(12).toString('hex')}`;
      const now = deps.now();
      let expiresAt = new Date(now.getTime() + days * DAY_MS).toISOString();
      // The tenant is checked in the write transaction: a replica removing it at the same time
      // either runs first (refused here) or after (and revokes this token with the tenant's).
      // So is the issuer: a revocation either commits first (refused here) or after (and
      // revokes this token with its issuer).
      await deps.writeTx(async (t) => {
        if (issuedBy !== null) {
          const issuer = (await AdminToken.findByPk(issuedBy, {
            attributes: ['id', 'revokedAt', 'expiresAt'],
            transaction: t,
            raw: true,
          })) as unknown as Pick<AdminTokenRow, 'id' | 'revokedAt' | 'expiresAt'> | null;
          if (!issuer || issuer.revokedAt !== null || isExpired(issuer, now.toISOString())) {
            throw new AdminAuthError('the issuing token is unknown, revoked or expired');
          }
          // No token outlives the token that issued it.
          if (issuer.expiresAt !== null && issuer.expiresAt < expiresAt) {
            expiresAt = issuer.expiresAt;
          }
        }
        if (isTenantRole && !(await deps.tenantExists(tenant as string, t))) {
          throw refuseTenant();
        }
        if (isTenantRole) {
          const max = deps.maxLiveTokensPerTenant ?? MAX_LIVE_TOKENS_PER_TENANT;
          const live = await AdminToken.count({
            where: {
              tenantId: tenant as string,
              revokedAt: { [Op.is]: null },
              [Op.or]: [
                { expiresAt: { [Op.is]: null } },
                { expiresAt: { [Op.gt]: now.toISOString() } },
              ],
            },
            transaction: t,
          });
          if (live >= max) {
            throw new ConflictError(
              `tenant ${tenant as string} already has ${String(max)} live tokens: revoke some first`,
            );
          }
        }
        await AdminToken.create(
          {
            id,
            role,
            tenantId: typeof tenant === 'string' ? tenant : null,
            label: typeof label === 'string' ? label : null,
            tokenHash: hashAdminToken(token),
            createdAt: now.toISOString(),
            revokedAt: null,
            issuedBy,
            expiresAt,
          },
          { transaction: t },
        );
      });
      return { id, token, expiresAt };
    },

    async authenticate(token) {
      const checked = await check(token);
      return 'principal' in checked ? checked.principal : undefined;
    },

    check,

    async revoke(id) {
      if (typeof id !== 'string') {
        throw new NotFoundError('admin token');
      }
      return deps.writeTx(async (t) => {
        if (!(await AdminToken.findByPk(id, { attributes: ['id'], transaction: t, raw: true }))) {
          throw new NotFoundError('admin token');
        }
        // Every descendant, through revoked ones too (a token revoked alone before issuers
        // cascaded may still have live children). Issue re-reads its issuer in a write
        // transaction, so none is added while this one runs.
        const ids = new Set([id]);
        let frontier = [id];
        while (frontier.length > 0) {
          const children = (await AdminToken.findAll({
            attributes: ['id'],
            where: { issuedBy: { [Op.in]: frontier } },
            transaction: t,
            raw: true,
          })) as unknown as Array<Pick<AdminTokenRow, 'id'>>;
          frontier = children.map((c) => c.id).filter((c) => !ids.has(c));
          for (const c of frontier) {
            ids.add(c);
          }
        }
        const live = { id: { [Op.in]: [...ids] }, revokedAt: { [Op.is]: null } };
        const taken = (await AdminToken.findAll({
          attributes: ['id', 'tenantId', 'issuedBy'],
          where: { ...live, id: { [Op.in]: [...ids].filter((d) => d !== id) } },
          transaction: t,
          raw: true,
        })) as unknown as Array<Pick<AdminTokenRow, 'id' | 'tenantId' | 'issuedBy'>>;
        await AdminToken.update(
          { revokedAt: deps.now().toISOString() },
          { where: live, transaction: t },
        );
        return taken.map((r) => ({
          id: r.id,
          ...(r.tenantId !== null ? { tenant: r.tenantId } : {}),
          ...(r.issuedBy !== null ? { issuedBy: r.issuedBy } : {}),
        }));
      });
    },

    async list() {
      const rows = await AdminToken.findAll({
        attributes: [
          'id',
          'role',
          'tenantId',
          'label',
          'createdAt',
          'revokedAt',
          'issuedBy',
          'expiresAt',
          'lastUsedAt',
        ],
        raw: true,
        order: [
          ['createdAt', 'ASC'],
          ['id', 'ASC'],
        ],
      });
      return (rows as unknown as AdminTokenRow[]).map(toInfo);
    },

    async revokeForTenant(tenantId, t) {
      await AdminToken.update(
        { revokedAt: deps.now().toISOString() },
        { where: { tenantId, revokedAt: { [Op.is]: null } }, transaction: t },
      );
    },

    async settled() {
      while (writing.size > 0) {
        await Promise.all(writing);
      }
    },
  };
}
