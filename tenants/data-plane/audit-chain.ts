/**
 * The tenant's audit chain, stored in its own store: `audit_events` (append-only; triggers
 * refuse UPDATE and DELETE) linked by hashes (see hash-chain.ts), and a head anchor in a
 * separate table (`audit_head`), updated in the same transaction as each append, so deleting
 * the last events is detected too. Events carry no PHI and no secrets.
 *
 * The chain has no secret: `verifyAudit` catches changes by someone who does not recompute it.
 * A rewrite with every later hash and the head recomputed is caught only against a head taken
 * earlier (`auditHead`) and kept outside the database's reach (server/audit-anchors.ts).
 */
import type { Transaction } from 'sequelize';
import { Op } from 'sequelize';
import { InvalidInputError } from '../errors.ts';
import type { AuditEvent } from '../types.ts';
import { createChainVerifier, nextChainEntry } from './hash-chain.ts';
import type { ChainHead, ChainVerification } from './hash-chain.ts';
import type { AuditEventRow } from './models.ts';
import type { StoreHandle } from './store-backend.ts';
import type { ChainedAuditEvent, TenantAuditInput } from './types.ts';

const TYPE_PATTERN = /^[a-z][a-z0-9._:-]{0,99}$/;
const MAX_DETAIL_KEYS = 32;
const MAX_DETAIL_STRING = 1000;
const PAGE = 1000;

type Detail = Record<string, string | number | boolean>;

/** What is hashed for one event: the tenant binds the chain to its store. */
interface HashedEvent {
  tenant: string;
  at: string;
  type: string;
  outcome: AuditEvent['outcome'];
  actor?: string;
  detail?: Detail;
}

/**
 * Checks an audit event (type, outcome, short actor, flat detail of short primitives).
 * @throws InvalidInputError naming the field.
 */
export function validateAuditEvent(input: unknown): TenantAuditInput {
  if (typeof input !== 'object' || input === null || Array.isArray(input)) {
    throw new InvalidInputError('event', 'must be an object');
  }
  const e = input as Record<string, unknown>;
  if (typeof e.type !== 'string' || !TYPE_PATTERN.test(e.type)) {
    throw new InvalidInputError('type', 'must be a dotted event name');
  }
  if (e.outcome !== 'success' && e.outcome !== 'failure') {
    throw new InvalidInputError('outcome', "must be 'success' or 'failure'");
  }
  if (
    e.actor !== undefined &&
    (typeof e.actor !== 'string' || e.actor.length === 0 || e.actor.length > 200)
  ) {
    throw new InvalidInputError('actor', 'must be a non-empty string of at most 200 characters');
  }
  const out: TenantAuditInput = { type: e.type, outcome: e.outcome };
  if (typeof e.actor === 'string') {
    out.actor = e.actor;
  }
  if (e.detail !== undefined) {
    if (typeof e.detail !== 'object' || e.detail === null || Array.isArray(e.detail)) {
      throw new InvalidInputError('detail', 'must be a flat object');
    }
    const entries = Object.entries(e.detail as Record<string, unknown>);
    if (entries.length > MAX_DETAIL_KEYS) {
      throw new InvalidInputError('detail', `must have at most ${MAX_DETAIL_KEYS} keys`);
    }
    const detail = Object.create(null) as Detail;
    for (const [k, v] of entries) {
      const ok =
        (typeof v === 'string' && v.length <= MAX_DETAIL_STRING) ||
        (typeof v === 'number' && Number.isFinite(v)) ||
        typeof v === 'boolean';
      if (!ok || k.length > 64) {
        throw new InvalidInputError(
          `detail.${k.slice(0, 64)}`,
          'must be a short string, a number or a boolean',
        );
      }
      detail[k] = v;
    }
    out.detail = { ...detail };
  }
  return out;
}

function hashedEvent(
  tenant: string,
  row: Pick<AuditEventRow, 'at' | 'type' | 'outcome' | 'actor' | 'detail'>,
): HashedEvent {
  return {
    tenant,
    at: row.at,
    type: row.type,
    outcome: row.outcome as AuditEvent['outcome'],
    ...(row.actor !== null ? { actor: row.actor } : {}),
    ...(row.detail !== null ? { detail: JSON.parse(row.detail) as Detail } : {}),
  };
}

function toChained(row: AuditEventRow): ChainedAuditEvent {
  return {
    seq: row.seq,
    at: row.at,
    type: row.type,
    outcome: row.outcome as AuditEvent['outcome'],
    ...(row.actor !== null ? { actor: row.actor } : {}),
    ...(row.detail !== null ? { detail: JSON.parse(row.detail) as Detail } : {}),
    prevHash: row.prevHash,
    hash: row.hash,
  };
}

/**
 * Appends one event inside the caller's write transaction (so a key event commits together
 * with the change it records). The head row is locked (PostgreSQL) against other replicas.
 */
export async function appendAuditInTx(
  h: StoreHandle,
  t: Transaction,
  event: TenantAuditInput,
  at: Date,
): Promise<ChainedAuditEvent> {
  const valid = validateAuditEvent(event);
  const head = await h.models.AuditHead.findByPk(1, {
    transaction: t,
    lock: t.LOCK.UPDATE,
    raw: true,
  });
  if (!head) {
    throw new Error('audit head anchor is missing');
  }
  const row: Omit<AuditEventRow, 'seq' | 'prevHash' | 'hash'> = {
    at: at.toISOString(),
    type: valid.type,
    outcome: valid.outcome,
    actor: valid.actor ?? null,
    detail: valid.detail !== undefined ? JSON.stringify(valid.detail) : null,
  };
  const entry = nextChainEntry({ seq: head.seq, hash: head.hash }, hashedEvent(h.tenant, row));
  const stored: AuditEventRow = {
    ...row,
    seq: entry.seq,
    prevHash: entry.prevHash,
    hash: entry.hash,
  };
  await h.models.AuditEvent.create(stored, { transaction: t });
  await h.models.AuditHead.update(
    { seq: entry.seq, hash: entry.hash },
    { where: { id: 1 }, transaction: t },
  );
  return toChained(stored);
}

/** Appends one event in its own write transaction. */
export function appendAudit(
  h: StoreHandle,
  event: TenantAuditInput,
  at: () => Date,
): Promise<ChainedAuditEvent> {
  // Validate before queueing so bad input fails fast without touching the store.
  const valid = validateAuditEvent(event);
  return h.writeTx((t) => appendAuditInTx(h, t, valid, at()));
}

/** Events after `afterSeq`, ascending. */
export async function listAudit(
  h: StoreHandle,
  opts: { afterSeq?: number; limit?: number } = {},
): Promise<ChainedAuditEvent[]> {
  const afterSeq = opts.afterSeq ?? 0;
  const limit = opts.limit ?? 1000;
  if (!Number.isInteger(afterSeq) || afterSeq < 0) {
    throw new InvalidInputError('afterSeq', 'must be a non-negative integer');
  }
  if (!Number.isInteger(limit) || limit < 1 || limit > 10_000) {
    throw new InvalidInputError('limit', 'must be an integer from 1 to 10000');
  }
  const rows = await h.models.AuditEvent.findAll({
    where: { seq: { [Op.gt]: afterSeq } },
    order: [['seq', 'ASC']],
    limit,
    raw: true,
  });
  return rows.map(toChained);
}

/** The stored head anchor. */
export async function auditHead(h: StoreHandle): Promise<ChainHead> {
  const head = await h.models.AuditHead.findByPk(1, { raw: true });
  if (!head) {
    throw new Error('audit head anchor is missing');
  }
  return { seq: head.seq, hash: head.hash };
}

/**
 * Walks the chain in pages inside one read snapshot and checks links, hashes, `seq` continuity
 * and the head anchor. A missing anchor counts as an anchor mismatch.
 */
export function verifyAudit(h: StoreHandle): Promise<ChainVerification> {
  return h.readTx(async (t) => {
    const head = await h.models.AuditHead.findByPk(1, { transaction: t, raw: true });
    const verifier = createChainVerifier();
    let after = Number.MIN_SAFE_INTEGER;
    let going = true;
    while (going) {
      const rows = await h.models.AuditEvent.findAll({
        where: { seq: { [Op.gt]: after } },
        order: [['seq', 'ASC']],
        limit: PAGE,
        transaction: t,
        raw: true,
      });
      for (const row of rows) {
        let event: HashedEvent;
        try {
          event = hashedEvent(h.tenant, row);
        } catch {
          // Unparseable detail: the row was edited.
          verifier.push({ seq: row.seq, prevHash: row.prevHash, hash: '', event: null });
          going = false;
          break;
        }
        if (!verifier.push({ seq: row.seq, prevHash: row.prevHash, hash: row.hash, event })) {
          going = false;
          break;
        }
        after = row.seq;
      }
      if (rows.length < PAGE) {
        going = false;
      }
    }
    return verifier.finish(head ? { seq: head.seq, hash: head.hash } : { seq: -1, hash: '' });
  });
}
