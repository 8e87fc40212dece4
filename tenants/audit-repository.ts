/**
 * The control-plane audit log: append-only (no update or delete API, and SQLite triggers
 * refuse both), ordered by a monotonically increasing `seq`. Events carry no PHI and no
 * secrets: only ids, reasons and counts. Hash chaining is added by issue 4 on top of `seq`.
 */
import { Op } from 'sequelize';
import type { WhereOptions } from 'sequelize';
import type { AuditRow, ControlPlaneModels, WriteLock } from './control-plane-models.ts';
import { InvalidInputError } from './errors.ts';
import type { AuditEvent, AuditQuery, AuditRepository, StoredAuditEvent } from './types.ts';

const TYPE_PATTERN = /^[a-z][a-z0-9._:-]{0,99}$/;
const MAX_DETAIL_KEYS = 32;
const MAX_DETAIL_STRING = 1000;
const MAX_LIST = 10_000;

function toEvent(row: AuditRow): StoredAuditEvent {
  return {
    seq: row.seq,
    at: row.at,
    type: row.type,
    outcome: row.outcome as AuditEvent['outcome'],
    ...(row.tenant !== null ? { tenant: row.tenant } : {}),
    ...(row.actor !== null ? { actor: row.actor } : {}),
    ...(row.detail !== null
      ? { detail: JSON.parse(row.detail) as Record<string, string | number | boolean> }
      : {}),
  };
}

function optionalString(value: unknown, field: string, max: number): string | null {
  if (value === undefined) {
    return null;
  }
  if (typeof value !== 'string' || value.length === 0 || value.length > max) {
    throw new InvalidInputError(field, `must be a non-empty string of at most ${max} characters`);
  }
  return value;
}

function validateEvent(input: unknown): Omit<AuditRow, 'seq' | 'at'> {
  if (typeof input !== 'object' || input === null) {
    throw new InvalidInputError('event', 'must be an object');
  }
  const e = input as Record<string, unknown>;
  if (typeof e.type !== 'string' || !TYPE_PATTERN.test(e.type)) {
    throw new InvalidInputError('type', 'must be a dotted event name');
  }
  if (e.outcome !== 'success' && e.outcome !== 'failure') {
    throw new InvalidInputError('outcome', "must be 'success' or 'failure'");
  }
  let detail: string | null = null;
  if (e.detail !== undefined) {
    if (typeof e.detail !== 'object' || e.detail === null || Array.isArray(e.detail)) {
      throw new InvalidInputError('detail', 'must be a flat object');
    }
    const entries = Object.entries(e.detail as Record<string, unknown>);
    if (entries.length > MAX_DETAIL_KEYS) {
      throw new InvalidInputError('detail', `must have at most ${MAX_DETAIL_KEYS} keys`);
    }
    const flat: Record<string, string | number | boolean> = Object.create(null) as Record<
      string,
      string | number | boolean
    >;
    for (const [k, v] of entries) {
      const ok =
        (typeof v === 'string' && v.length <= MAX_DETAIL_STRING) ||
        (typeof v === 'number' && Number.isFinite(v)) ||
        typeof v === 'boolean';
      if (!ok) {
        throw new InvalidInputError(
          `detail.${k.slice(0, 64)}`,
          'must be a short string, a number or a boolean',
        );
      }
      flat[k] = v;
    }
    detail = JSON.stringify(flat);
  }
  return {
    type: e.type,
    outcome: e.outcome,
    tenant: optionalString(e.tenant, 'tenant', 63),
    actor: optionalString(e.actor, 'actor', 200),
    detail,
  };
}

function instant(value: string | Date | undefined, field: string): string | undefined {
  if (value === undefined) {
    return undefined;
  }
  const d = value instanceof Date ? value : new Date(value);
  if (Number.isNaN(d.getTime())) {
    throw new InvalidInputError(field, 'must be an ISO 8601 instant');
  }
  return d.toISOString();
}

/** Creates the audit repository. */
export function createAuditRepository(deps: {
  models: ControlPlaneModels;
  now: () => Date;
  write: WriteLock;
}): AuditRepository {
  const { Audit } = deps.models;
  return {
    async record(event) {
      const valid = validateEvent(event);
      // `at` is taken inside the lock so that seq order and time order agree.
      const created = await deps.write(() =>
        Audit.create({ ...valid, at: deps.now().toISOString() }),
      );
      return toEvent(created.get({ plain: true }));
    },

    async list(query: AuditQuery = {}) {
      const from = instant(query.from, 'from');
      const to = instant(query.to, 'to');
      const where: WhereOptions<AuditRow> = {};
      const at: Record<symbol, string> = {};
      if (from !== undefined) {
        at[Op.gte] = from;
      }
      if (to !== undefined) {
        at[Op.lt] = to;
      }
      if (from !== undefined || to !== undefined) {
        Object.assign(where, { at });
      }
      // Query values often come straight from a URL query string: accept single strings only.
      const tenant: unknown = query.tenant;
      const type: unknown = query.type;
      if (tenant !== undefined) {
        if (typeof tenant !== 'string') {
          throw new InvalidInputError('tenant', 'must be a single tenant id');
        }
        Object.assign(where, { tenant });
      }
      if (type !== undefined) {
        if (typeof type !== 'string') {
          throw new InvalidInputError('type', 'must be a single event type');
        }
        Object.assign(where, { type });
      }
      const rows = await Audit.findAll({
        where,
        raw: true,
        order: [['seq', 'ASC']],
        limit: MAX_LIST,
      });
      return (rows as unknown as AuditRow[]).map(toEvent);
    },
  };
}
