/**
 * Kept anchors of the audit chains (the control plane's and each tenant's). A chain's head
 * (`{ chain, seq, hash, at }`) is exported to be kept outside the operator's reach (the evidence
 * report, a ticket, WORM storage); verifying with kept anchors then fails when the chain no
 * longer holds that exact hash at that `seq`. The chains are plain sha256 hash chains, so this is
 * what catches an insider with write access to a database who deletes or edits an event and
 * recomputes every later hash and the head row: the chain alone verifies again after that.
 *
 * An anchor is written `SEQ:HASH` (a query's `anchor`, the CLI's `--anchor`), or kept as the JSON
 * `audit head` prints, a list of those, or an evidence report (its `anchors`).
 */
import { authorize, GENESIS_HASH, InvalidInputError } from '../tenants/index.ts';
import type { ChainHead, ChainVerification, ControlPlane, Principal } from '../tenants/index.ts';
import { actorOf } from './admin-service.ts';

/** The most kept anchors one verification takes. */
export const MAX_ANCHORS = 100;
/** The control-plane chain's name (a tenant's is `tenant:<id>`). */
export const CONTROL_PLANE_CHAIN = 'control-plane';

const ANCHOR_TEXT = /^([0-9]{1,15}):([0-9a-fA-F]{64})$/;

/** A chain's head as exported: what to keep. `at`: when it was read. */
export interface ExportedHead extends ChainHead {
  chain: string;
  at: string;
}

/** The name of a tenant's chain in exported heads and anchor files. */
export const tenantChain = (tenant: string): string => `tenant:${tenant}`;

/**
 * Parses one anchor, `SEQ:HASH` (a decimal seq, 64 hex digits).
 * @throws InvalidInputError (`anchor`) naming what is wrong.
 */
export function parseAnchor(text: string): ChainHead {
  const m = ANCHOR_TEXT.exec(text.trim());
  if (!m) {
    throw new InvalidInputError(
      'anchor',
      `${JSON.stringify(text.slice(0, 100))} is not SEQ:HASH (a sequence number, a colon, the 64 hex digits of the hash, as \`audit head\` prints them)`,
    );
  }
  return { seq: Number(m[1]), hash: (m[2] ?? '').toLowerCase() };
}

const tooMany = () =>
  new InvalidInputError('anchor', `at most ${String(MAX_ANCHORS)} anchors per verification`);

/**
 * The `anchor` query parameter: absent, one `SEQ:HASH`, or a repeated parameter (a list).
 * @throws InvalidInputError (`anchor`).
 */
export function anchorsOfQuery(value: unknown): ChainHead[] {
  if (value === undefined) {
    return [];
  }
  const values = Array.isArray(value) ? (value as unknown[]) : [value];
  if (values.length > MAX_ANCHORS) {
    throw tooMany();
  }
  return values.map((v) => {
    if (typeof v !== 'string') {
      throw new InvalidInputError('anchor', 'must be SEQ:HASH');
    }
    return parseAnchor(v);
  });
}

function anchorOfJson(value: unknown, where: string): { chain?: string; anchor: ChainHead } {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    throw new InvalidInputError('anchor', `${where}: not an object {chain, seq, hash}`);
  }
  const o = value as Record<string, unknown>;
  if (o.chain !== undefined && typeof o.chain !== 'string') {
    throw new InvalidInputError('anchor', `${where}: chain must be a string`);
  }
  if (typeof o.seq !== 'number' || typeof o.hash !== 'string') {
    throw new InvalidInputError('anchor', `${where}: needs a numeric seq and a hash`);
  }
  const anchor = parseAnchor(`${String(o.seq)}:${o.hash}`);
  return typeof o.chain === 'string' ? { chain: o.chain, anchor } : { anchor };
}

/**
 * The anchors a kept file holds for `chain`. The file is JSON (a head as `audit head` prints it,
 * a list of them, or an evidence report, whose `anchors` list each chain's head) or text, one
 * `SEQ:HASH` a line (`#` starts a comment). Entries naming another chain are skipped; a file
 * with none for this chain is refused rather than read as "nothing to check".
 * @throws InvalidInputError (`anchor`) naming the file and what is wrong.
 */
export function anchorsOfFile(text: string, chain: string, file: string): ChainHead[] {
  const trimmed = text.trim();
  let entries: Array<{ chain?: string; anchor: ChainHead }>;
  if (trimmed.startsWith('{') || trimmed.startsWith('[')) {
    let json: unknown;
    try {
      json = JSON.parse(trimmed) as unknown;
    } catch {
      throw new InvalidInputError('anchor', `${file}: not valid JSON`);
    }
    const list =
      typeof json === 'object' && json !== null && !Array.isArray(json) && 'anchors' in json
        ? json.anchors
        : json;
    entries = (Array.isArray(list) ? (list as unknown[]) : [list]).map((v, i) =>
      anchorOfJson(v, `${file} entry ${String(i + 1)}`),
    );
  } else {
    entries = trimmed
      .split(/\r?\n/)
      .map((line) => line.replace(/#.*$/, '').trim())
      .filter((line) => line !== '')
      .map((line) => ({ anchor: parseAnchor(line) }));
  }
  const mine = entries.filter((e) => e.chain === undefined || e.chain === chain);
  if (mine.length === 0) {
    throw new InvalidInputError('anchor', `${file} holds no anchor of the ${chain} chain`);
  }
  if (mine.length > MAX_ANCHORS) {
    throw tooMany();
  }
  return mine.map((e) => e.anchor);
}

/**
 * Adds the kept anchors' checks to a chain's verification: each holds when the chain has exactly
 * that hash at that `seq` (`seq` 0: the empty chain's genesis hash). A chain that itself fails
 * keeps its own problem; otherwise the first anchor not held (lowest `seq`) fails it as
 * `anchor_not_held`. Without anchors the verification is returned as it was.
 */
export async function withKeptAnchors(
  result: ChainVerification,
  kept: readonly ChainHead[],
  hashAt: (seq: number) => Promise<string | undefined>,
): Promise<ChainVerification> {
  if (kept.length === 0) {
    return result;
  }
  const anchors: NonNullable<ChainVerification['anchors']> = [];
  for (const a of kept) {
    const held = a.seq === 0 ? GENESIS_HASH : await hashAt(a.seq);
    anchors.push({ seq: a.seq, hash: a.hash, held: held === a.hash });
  }
  const notHeld = anchors.filter((a) => !a.held).sort((x, y) => x.seq - y.seq)[0];
  if (!result.ok || notHeld === undefined) {
    return { ...result, anchors };
  }
  return { ...result, ok: false, firstBadSeq: notHeld.seq, problem: 'anchor_not_held', anchors };
}

/** An `audit.verify` event's detail: the count, the anchors checked, and what failed. */
export function verificationDetail(
  result: ChainVerification,
  kept: readonly ChainHead[],
): Record<string, number | string> {
  return {
    count: result.count,
    ...(kept.length > 0 ? { anchors: kept.length } : {}),
    ...(result.problem !== undefined ? { problem: result.problem } : {}),
    ...(result.firstBadSeq !== undefined ? { firstBadSeq: result.firstBadSeq } : {}),
  };
}

/** The control-plane audit log's chain: its verification, head and links. */
export type ChainedAudit = Pick<ControlPlane['audit'], 'verify' | 'head' | 'hashAt'>;

/** The control plane's audit log as a chain (the parts a verification with anchors reads). */
export function controlPlaneChain(audit: ControlPlane['audit']): ChainedAudit {
  return {
    verify: () => audit.verify(),
    head: () => audit.head(),
    hashAt: (seq) => audit.hashAt(seq),
  };
}

/**
 * The control-plane chain's head, to keep (`audit:read` on the whole platform, as its
 * verification). Audited `audit.head` after the read (so the event follows the exported head).
 * @throws ForbiddenError (403).
 */
export async function controlPlaneAuditHead(
  controlPlane: Pick<ControlPlane, 'audit'>,
  principal: Principal,
  now: () => Date = () => new Date(),
): Promise<ExportedHead> {
  authorize(principal, 'audit:read');
  const head = await controlPlaneChain(controlPlane.audit).head();
  const at = now().toISOString();
  await controlPlane.audit.record({
    type: 'audit.head',
    outcome: 'success',
    actor: actorOf(principal),
    detail: { chain: CONTROL_PLANE_CHAIN, seq: head.seq },
  });
  return { chain: CONTROL_PLANE_CHAIN, seq: head.seq, hash: head.hash, at };
}

/**
 * Verifies the control-plane audit chain (edited, deleted or reordered events, by someone who
 * did not recompute the chain) and, against `kept` anchors, a recomputed one. Audited
 * `audit.verify` (`count`, `anchors`).
 * @throws ForbiddenError (403).
 */
export async function verifyControlPlaneAudit(
  controlPlane: Pick<ControlPlane, 'audit'>,
  principal: Principal,
  kept: readonly ChainHead[] = [],
): Promise<ChainVerification> {
  authorize(principal, 'audit:read');
  const chain = controlPlaneChain(controlPlane.audit);
  const result = await withKeptAnchors(await chain.verify(), kept, chain.hashAt);
  await controlPlane.audit.record({
    type: 'audit.verify',
    outcome: result.ok ? 'success' : 'failure',
    actor: actorOf(principal),
    detail: verificationDetail(result, kept),
  });
  return result;
}
