import { expect } from 'chai';
import { forEachBackend, invocation, makeEnv } from './helpers.ts';
import type { Env } from './helpers.ts';

/**
 * `onRecordWrite` (metrics: store write latency): told once per committed record write, with the
 * record kind and the seconds from the store call to the commit; not told of a refused write;
 * a listener that throws changes nothing.
 */
forEachBackend('tenants/ data plane: record write observer', (backend) => {
  let env: Env | undefined;
  afterEach(async () => {
    await env?.close();
    env = undefined;
  });

  it('reports each committed invocation and feedback write with its seconds, not a refused one', async () => {
    const seen: Array<[string, number]> = [];
    env = await makeEnv(backend, {
      stores: {
        onRecordWrite: (record, seconds) => {
          seen.push([record, seconds]);
        },
      },
    });
    const store = env.stores.store('acme');
    const started = performance.now();
    await Promise.all([1, 2, 3].map((i) => store.saveInvocation(invocation(`inv-${i}`))));
    const elapsed = (performance.now() - started) / 1000;
    await store.saveFeedback(
      [{ card: 'card-inv-1', outcome: 'accepted', outcomeTimestamp: '2025-01-01T13:00:00Z' }],
      { service: 'med-safety' },
    );
    // A duplicate id is refused (409): not a commit.
    const dup = await store.saveInvocation(invocation('inv-1')).then(
      () => undefined,
      (err: unknown) => err,
    );
    expect(dup).to.be.instanceOf(Error);
    expect(seen.map(([r]) => r)).to.deep.equal([
      'invocation',
      'invocation',
      'invocation',
      'feedback',
    ]);
    for (const [, seconds] of seen.slice(0, 3)) {
      expect(seconds).to.be.above(0).and.at.most(elapsed);
    }
  });

  it('writes all the same when the listener throws', async () => {
    env = await makeEnv(backend, {
      stores: {
        onRecordWrite: () => {
          throw new Error('listener fault');
        },
      },
    });
    const store = env.stores.store('acme');
    await store.saveInvocation(invocation('inv-1'));
    const list = await store.listInvocations();
    expect(list.map((r) => r.id)).to.deep.equal(['inv-1']);
  });
});
