/**
 * The control-plane audit log: append-only (no update or delete API, and SQLite triggers
 * refuse both), ordered by a monotonically increasing `seq`. Events carry no PHI and no
 * secrets: only ids, reasons and counts. Each event is a link of a hash chain
 * (data-plane/hash-chain.ts) with a head row (`audit_head`) moved in the same transaction.
 * The chain alone detects edits by someone who does not recompute it; a head exported with
 * `head()` and kept elsewhere (a kept anchor) is what detects a rewrite by someone who does
 * (see hash-chain.ts and `hashAt`).
 */
import { Op } from 'sequelize';
import type { Transaction } from 'sequelize';
import type { WhereOptions } from 'sequelize';
import type {
  AuditHeadRow,
  AuditRow,
  ControlPlaneModels,
  WriteTx,
} from './control-plane-models.ts';
import { createChainVerifier, GENESIS_HASH, nextChainEntry } from './data-plane/hash-chain.ts';
import { InvalidInputError } from './errors.ts';
import type { AuditEvent, AuditQuery, AuditRepository, StoredAuditEvent } from './types.ts';

const TYPE_PATTERN = /^[a-z][a-z0-9._:-]{0,99}$/;
const MAX_DETAIL_KEYS = 32;
const MAX_DETAIL_STRING = 1000;
const MAX_LIST = 10_000;
/**
 * A request id as the server writes them (`X-Request-Id`: a UUID, kept to 64 characters in an
 * event's detail). No LIKE wildcard (`%`, `_`), quote or backslash can be in one, so it is
 * matched as a literal inside the stored detail JSON.
 */
const REQUEST_ID_PATTERN = /^[A-Za-z0-9.:-]{1,64}$/;

/**
 * {@link AuditQuery}; its `requestId` keeps the events whose `detail.requestId` is exactly this
 * id (refusals name the request id they were given: `auth.failure`, `admin.auth`,
 * `admin.forbidden`, `residency.misdirected`...).
 */
export type AuditListQuery = AuditQuery;

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

type EventColumns = Omit<AuditRow, 'seq' | 'at' | 'prevHash' | 'hash'>;

/** What a chain link hashes: the event as stored (time included), canonical JSON. */
export function chainedEvent(
  row: Pick<AuditRow, 'at' | 'type' | 'outcome' | 'tenant' | 'actor' | 'detail'>,
): unknown {
  return {
    at: row.at,
    type: row.type,
    outcome: row.outcome,
    tenant: row.tenant,
    actor: row.actor,
    detail: row.detail,
  };
}

function validateEvent(input: unknown): EventColumns {
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

/**
 * Appends one event to the control-plane chain inside the caller's write transaction (so a
 * change and its audit event commit together). Every insert into audit_events goes through
 * here: a row written any other way would break the chain.
 */
export async function appendAuditEvent(
  models: ControlPlaneModels,
  at: string,
  event: AuditEvent,
  transaction: Transaction,
): Promise<AuditRow> {
  const { Audit, AuditHead } = models;
  const row = { ...validateEvent(event), at };
  const head = (await AuditHead.findByPk(1, { transaction, raw: true })) as AuditHeadRow | null;
  const link = nextChainEntry(
    head ? { seq: head.seq, hash: head.hash } : undefined,
    chainedEvent(row),
  );
  const stored = await Audit.create(
    { ...row, seq: link.seq, prevHash: link.prevHash, hash: link.hash },
    { transaction },
  );
  await AuditHead.upsert({ id: 1, seq: link.seq, hash: link.hash }, { transaction });
  return stored.get({ plain: true });
}

/** Creates the audit repository. */
export function createAuditRepository(deps: {
  models: ControlPlaneModels;
  now: () => Date;
  writeTx: WriteTx;
}): AuditRepository {
  const { Audit, AuditHead } = deps.models;
  return {
    async record(event) {
      // `at` and the chain link are taken inside the write transaction, so seq order, time
      // order and chain order agree, and the head moves with the event or not at all.
      const created = await deps.writeTx((transaction) =>
        appendAuditEvent(deps.models, deps.now().toISOString(), event, transaction),
      );
      return toEvent(created);
    },

    /** Walks the chain in pages: detects edited, deleted (middle or last) and reordered events. */
    async verify() {
      const verifier = createChainVerifier();
      let after = 0;
      for (;;) {
        const rows = (await Audit.findAll({
          where: { seq: { [Op.gt]: after } },
          order: [['seq', 'ASC']],
          limit: 1000,
          raw: true,
        })) as unknown as AuditRow[];
        if (rows.length === 0) {
          break;
        }
        let going = true;
        for (const r of rows) {
          going = verifier.push({
            seq: r.seq,
            prevHash: r.prevHash,
            hash: r.hash,
            event: chainedEvent(r),
          });
          if (!going) {
            break;
          }
        }
        if (!going) {
          break;
        }
        after = rows[rows.length - 1]?.seq ?? after;
      }
      const head = (await AuditHead.findByPk(1, { raw: true })) as AuditHeadRow | null;
      return verifier.finish(
        head ? { seq: head.seq, hash: head.hash } : { seq: 0, hash: GENESIS_HASH },
      );
    },

    async head() {
      const head = (await AuditHead.findByPk(1, { raw: true })) as AuditHeadRow | null;
      return head ? { seq: head.seq, hash: head.hash } : { seq: 0, hash: GENESIS_HASH };
    },

    async hashAt(seq) {
      if (!Number.isSafeInteger(seq) || seq < 1) {
        return undefined;
      }
      const row = (await Audit.findByPk(seq, {
        attributes: ['hash'],
        raw: true,
      })) as Pick<AuditRow, 'hash'> | null;
      return row?.hash;
    },

    async list(query: AuditListQuery = {}) {
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
      const requestId: unknown = query.requestId;
      if (requestId !== undefined) {
        if (typeof requestId !== 'string' || !REQUEST_ID_PATTERN.test(requestId)) {
          throw new InvalidInputError(
            'requestId',
            'must be a single request id (the X-Request-Id a refusal named: letters, digits, -, . or :, at most 64)',
          );
        }
        // The detail column is the flat JSON object `validateEvent` wrote (JSON.stringify: no
        // spaces, a quote inside a value escaped), so this literal only matches the requestId
        // member itself. Both dialects run it the same way; SQLite's LIKE ignores ASCII case,
        // hence the exact check on the parsed detail below.
        Object.assign(where, {
          detail: { [Op.like]: `%${JSON.stringify({ requestId }).slice(1, -1)}%` },
        });
      }
      const rows = await Audit.findAll({
        where,
        raw: true,
        order: [['seq', 'ASC']],
        limit: MAX_LIST,
      });
      const events = (rows as unknown as AuditRow[]).map(toEvent);
      return requestId === undefined
        ? events
        : events.filter((e) => e.detail?.requestId === requestId);
    },
  };
}
