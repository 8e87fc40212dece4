import { expect } from 'chai';
import { createFailureAuditor, MAX_COUNT_EVENTS_PER_SECOND } from '../../server/failure-audit.ts';
import type { AuditEvent } from '../../tenants/index.ts';

const refusal = (reason: string) =>
  ({ type: 'auth.failure', outcome: 'failure', detail: { reason } }) as const;

describe('server/ createFailureAuditor', () => {
  // flush() is what a clean shutdown (and the flood spec) waits on: it must not return while
  // the counts of an earlier second are still being written by the timer's flush.
  it('flush() waits for a flush the timer already started', async () => {
    const written: AuditEvent[] = [];
    let release: (() => void) | undefined;
    let block = false;
    const audit = async (event: AuditEvent) => {
      if (block) {
        await new Promise<void>((resolve) => {
          release = resolve;
        });
      }
      written.push(event);
    };
    const auditor = createFailureAuditor({ audit, perSecond: 1 });
    await auditor.record(refusal('malformed'));
    await auditor.record(refusal('malformed')); // over the budget: counted, a timer set
    block = true;
    // The timer fires at the end of this second (+5 ms) and starts writing the count.
    await new Promise((resolve) => setTimeout(resolve, 1100));
    expect(release).to.be.a('function');
    let flushed = false;
    const flushing = auditor.flush().then(() => {
      flushed = true;
    });
    await new Promise((resolve) => setTimeout(resolve, 50));
    expect(flushed).to.equal(false);
    release?.();
    await flushing;
    expect(written.map((e) => e.type)).to.deep.equal(['auth.failure', 'auth.failure.suppressed']);
  });

  it('writes every count once, whoever flushes', async () => {
    const written: AuditEvent[] = [];
    let at = Date.parse('2026-12-06T10:00:00.100Z');
    const auditor = createFailureAuditor({
      audit: async (event) => {
        await new Promise((resolve) => setImmediate(resolve));
        written.push(event);
      },
      perSecond: 1,
      now: () => at,
    });
    for (let i = 0; i < 4; i++) {
      await auditor.record(refusal('malformed'));
    }
    at += 1000; // the next second: its first refusal flushes the last second's count
    const next = auditor.record(refusal('expired'));
    await Promise.all([next, auditor.flush(), auditor.flush()]);
    const counts = written.filter((e) => e.type === 'auth.failure.suppressed');
    expect(counts.map((e) => [e.detail?.reason, e.detail?.count])).to.deep.equal([
      ['malformed', 3],
    ]);
    expect(written.filter((e) => e.type === 'auth.failure')).to.have.length(2);
  });

  it("audits a refusal's detail as given, and counts the rest by reason without the EHR's values", async () => {
    const written: AuditEvent[] = [];
    const auditor = createFailureAuditor({
      audit: (event) => {
        written.push(event);
        return Promise.resolve();
      },
      perSecond: 1,
      now: () => Date.parse('2026-12-06T10:00:00.100Z'),
    });
    const badAud = (aud1: string) =>
      ({
        type: 'auth.failure',
        outcome: 'failure',
        detail: { reason: 'bad_aud', aud1, audCount: 1, expectedAud: 'https://cds/x' },
      }) as const;
    await auditor.record(badAud('https://a.example'));
    await auditor.record(badAud('https://b.example'));
    await auditor.record(badAud('https://c.example'));
    await auditor.flush();
    expect(written[0]?.detail).to.deep.equal(badAud('https://a.example').detail);
    expect(written[1]?.type).to.equal('auth.failure.suppressed');
    expect(written[1]?.detail).to.have.keys(['reason', 'count', 'from', 'to']);
    expect(written[1]?.detail).to.include({ reason: 'bad_aud', count: 2 });
  });

  it('bounds the count events of one second however many actors and tenants refuse (attribution kept for the first few)', async () => {
    const written: AuditEvent[] = [];
    let at = Date.parse('2026-12-06T10:00:00.100Z');
    const auditor = createFailureAuditor({
      audit: (event) => {
        written.push(event);
        return Promise.resolve();
      },
      perSecond: 1,
      now: () => at,
    });
    // 200 refused accesses by 200 distinct tokens (a tenant-admin can issue auditor tokens).
    for (let i = 0; i < 200; i++) {
      await auditor.record({
        type: 'admin.forbidden',
        outcome: 'failure',
        tenant: 'hosp-b',
        actor: `auditor:tok_${String(i).padStart(4, '0')}`,
        detail: { reason: 'records:read' },
      });
    }
    at += 1000;
    await auditor.flush();
    const counts = written.filter((e) => e.type === 'admin.forbidden.suppressed');
    expect(counts.length).to.be.at.most(MAX_COUNT_EVENTS_PER_SECOND + 1);
    expect(counts.reduce((n, e) => n + Number(e.detail?.count), 0)).to.equal(199);
    // The first keys keep who and where; the rest are counted together, without an actor.
    expect(counts[0]?.actor).to.equal('auditor:tok_0001');
    const rest = counts.find((e) => e.actor === undefined);
    expect(rest?.detail).to.include({ reason: 'records:read' });
  });
});
