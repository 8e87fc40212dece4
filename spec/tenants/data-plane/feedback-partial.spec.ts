/**
 * `saveFeedback(items, { service, partial: true })` stores every item it can and returns the
 * refused ones (a card this service never sent to this tenant, a suggestion its card never
 * offered), each item written whole or not at all. A report differing from the stored ones in
 * card, outcome, instant, suggestion set or override reason is stored, an exact repeat is not.
 * Ids stay those every release used (no older replica stores a repeat twice), and the override
 * reason, sealed, is never hashed into the id stored in clear.
 */
import crypto from 'node:crypto';
import { expect } from 'chai';
import { NotFoundError } from '../../../tenants/errors.ts';
import type { FeedbackInput } from '../../../tenants/data-plane.ts';
import { canonicalJson } from '../../../tenants/data-plane/hash-chain.ts';
import { asInstance, forEachBackend, invocation, makeEnv, rejection } from './helpers.ts';
import type { Env } from './helpers.ts';

const SERVICE = 'med-safety';

const fb = (card: string, extra: Partial<FeedbackInput> = {}): FeedbackInput => ({
  card,
  outcome: 'overridden',
  outcomeTimestamp: '2025-01-01T12:05:00Z',
  ...extra,
});

/** The id of a report's identity (card, outcome, instant, suggestions), as every release made it. */
function previousFeedbackId(item: FeedbackInput): string {
  const suggestions = [...new Set((item.acceptedSuggestions ?? []).map((s) => s.id))].sort();
  return crypto
    .createHash('sha256')
    .update(
      canonicalJson({
        card: item.card,
        outcome: item.outcome,
        outcomeTimestamp: new Date(item.outcomeTimestamp).toISOString(),
        suggestions,
      }),
    )
    .digest('hex');
}

forEachBackend(
  'tenants/ data plane: partial feedback batches and the idempotency id',
  (backend) => {
    let env: Env;
    beforeEach(async () => {
      env = await makeEnv(backend);
    });
    afterEach(async () => env.close());

    it('stores the items it can and returns the refused ones, in input order', async () => {
      const a = env.stores.store('acme');
      const b = env.stores.store('beta');
      await a.saveInvocation(invocation('inv-1'));
      await b.saveInvocation(invocation('inv-9'));
      const result = await a.saveFeedback(
        [
          fb('card-never-sent'),
          fb('card-inv-1'),
          fb('card-inv-9'), // another tenant's card: the same as one never sent
          fb('card-inv-1', {
            outcome: 'accepted',
            acceptedSuggestions: [{ id: 'sugg-inv-1' }, { id: 'sugg-elsewhere' }],
          }),
          fb('card-inv-1'), // a repeat within the batch
        ],
        { service: SERVICE, partial: true },
      );
      expect(result).to.include({ stored: 1, duplicates: 1 });
      expect(result.refused).to.deep.equal([
        { index: 0, what: 'card' },
        { index: 2, what: 'card' },
        { index: 3, what: 'suggestion', suggestion: 1 },
      ]);
      const rec = await a.readInvocation('inv-1');
      expect(rec.feedback.map((f) => [f.card, f.outcome])).to.deep.equal([
        ['card-inv-1', 'overridden'],
      ]);
      expect((await b.readInvocation('inv-9')).feedback).to.deep.equal([]);
    });

    it('returns every item refused without throwing, and writes nothing', async () => {
      const a = env.stores.store('acme');
      await a.saveInvocation(invocation('inv-1'));
      const result = await a.saveFeedback([fb('card-inv-1'), fb('card-x')], {
        service: 'another-service',
        partial: true,
      });
      expect(result).to.include({ stored: 0, duplicates: 0 });
      expect((result.refused ?? []).map((r) => r.index)).to.deep.equal([0, 1]);
      expect((await a.readInvocation('inv-1')).feedback).to.deep.equal([]);
    });

    it('without partial, still refuses the whole batch at its first refused item', async () => {
      const a = env.stores.store('acme');
      await a.saveInvocation(invocation('inv-1'));
      const err = await rejection(
        a.saveFeedback([fb('card-inv-1'), fb('card-never-sent')], { service: SERVICE }),
      );
      expect(asInstance(err, NotFoundError).message).to.equal('card not found');
      expect((await a.readInvocation('inv-1')).feedback).to.deep.equal([]);
    });

    it('stores a report differing only in overrideReason; an exact repeat is a duplicate', async () => {
      const s = env.stores.store('acme');
      await s.saveInvocation(invocation('inv-1'));
      const variants: FeedbackInput[] = [
        fb('card-inv-1'),
        fb('card-inv-1', { overrideReason: { reason: { code: 'a', system: 'http://s' } } }),
        fb('card-inv-1', { overrideReason: { reason: { code: 'b', system: 'http://s' } } }),
        fb('card-inv-1', {
          overrideReason: { reason: { code: 'b', system: 'http://s' }, userComment: 'why' },
        }),
      ];
      const first = await s.saveFeedback(variants, { service: SERVICE });
      expect(first).to.include({ stored: 4, duplicates: 0 });
      expect(first, 'no refusal list without partial').to.not.have.property('refused');
      expect(new Set(first.ids).size).to.equal(4);
      const again = await s.saveFeedback(
        // Key order and the instant's spelling do not make a report new.
        variants.map((v) => ({
          ...v,
          outcomeTimestamp: '2025-01-01T12:05:00.000Z',
          ...(v.overrideReason ? { overrideReason: { ...v.overrideReason } } : {}),
        })),
        { service: SERVICE },
      );
      expect(again).to.include({ stored: 0, duplicates: 4 });
      expect(again.ids).to.deep.equal(first.ids);
      expect((await s.readInvocation('inv-1')).feedback).to.have.length(4);
    });

    it('stores a report under the id of its identity, the one every release used, so older replicas see its repeats', async () => {
      const s = env.stores.store('acme');
      await s.saveInvocation(invocation('inv-1'));
      const item = fb('card-inv-1', {
        outcome: 'accepted',
        acceptedSuggestions: [{ id: 'sugg-inv-1' }],
      });
      const reasoned = fb('card-inv-2-x', {
        overrideReason: { reason: { code: 'a', system: 'http://s' }, userComment: 'first' },
      });
      const saved = await s.saveFeedback([item], { service: SERVICE });
      expect(saved.ids).to.deep.equal([previousFeedbackId(item)]);
      const repeat = await s.saveFeedback([item], { service: SERVICE });
      expect(repeat).to.include({ stored: 0, duplicates: 1 });
      // The override reason is sealed; the id, in clear, is not derived from it.
      expect(previousFeedbackId(reasoned)).to.equal(
        previousFeedbackId({ ...reasoned, overrideReason: { userComment: 'other' } }),
      );
    });

    it('keeps reports of one identity with other reasons apart, never hashing a reason into an id', async () => {
      const s = env.stores.store('acme');
      await s.saveInvocation(invocation('inv-1'));
      const reasoned = fb('card-inv-1', {
        overrideReason: { reason: { code: 'a', system: 'http://s' }, userComment: 'first' },
      });
      const legacy = previousFeedbackId(reasoned);
      const saved = await s.saveFeedback([reasoned], { service: SERVICE });
      expect(saved.ids).to.deep.equal([legacy]);

      const repeat = await s.saveFeedback([reasoned], { service: SERVICE, partial: true });
      expect(repeat).to.include({ stored: 0, duplicates: 1 });
      expect(repeat.ids).to.deep.equal([legacy]);
      const other = fb('card-inv-1', {
        overrideReason: { reason: { code: 'a', system: 'http://s' }, userComment: 'second' },
      });
      const plain = fb('card-inv-1');
      const more = await s.saveFeedback([other, plain, reasoned, other], { service: SERVICE });
      expect(more).to.include({ stored: 2, duplicates: 2 });
      expect(more.ids[2]).to.equal(legacy);
      expect(new Set(more.ids).size).to.equal(3);
      expect(more.ids[0]).to.equal(more.ids[3]);
      const stored = (await s.readInvocation('inv-1')).feedback;
      expect(stored.map((f) => f.item.overrideReason?.userComment ?? null).sort()).to.deep.equal(
        ['first', 'second', null].sort(),
      );
      // Each again: all repeats, under the same ids.
      const again = await s.saveFeedback([plain, other, reasoned], { service: SERVICE });
      expect(again).to.include({ stored: 0, duplicates: 3 });
      expect(again.ids).to.deep.equal([more.ids[1], more.ids[0], legacy]);
    });
  },
);
