/**
 * Compiling a pack without holding the thread (compilePackInSlices, programInSlices): the same
 * hash and program as compilePack, a piece at a time, letting the event loop run. And the
 * evaluator never compiles a pack in one block in the calling thread: a call for a pack not
 * compiled there goes to a worker while the pack compiles there in slices, for later calls.
 */
import crypto from 'node:crypto';
import { expect } from 'chai';
import {
  compilePack,
  compilePackInSlices,
  createEvaluator,
  packHash,
  PackValidationError,
  threadCompileCounts,
} from '../../rules/index.ts';
import type { CompiledPack, EvaluationInput, RulePack } from '../../rules/index.ts';
import { deepFreeze } from '../../rules/compile-pack.ts';
import { packHashSteps } from '../../rules/pack-format.ts';
import { shippedPackRaw } from '../helpers/test-app.ts';

function runSteps<T>(steps: Generator<undefined, T, undefined>): T {
  for (;;) {
    const step = steps.next();
    if (step.done === true) {
      return step.value;
    }
  }
}

/** A small pack no spec has compiled yet (a fresh id each time). */
function freshPack(when = "%patient.gender = 'female'"): RulePack {
  const id = `slices-${crypto.randomBytes(4).toString('hex')}`;
  return {
    id,
    version: '1.0.0',
    title: 'Slices',
    publisher: 'specs',
    description: 'A pack compiled in slices',
    services: [{ id: 'svc', hook: 'patient-view', description: 'a service' }],
    let: { female: "%patient.gender = 'female'" },
    rules: [
      {
        id: 'r1',
        service: 'svc',
        when,
        card: { summary: 'card {{ %patient.id }}', indicator: 'info', source: { label: 'specs' } },
      },
      {
        id: 'r2',
        service: 'svc',
        when: '%female',
        card: { summary: 'second', indicator: 'info', source: { label: 'specs' } },
      },
    ],
  };
}

function input(): EvaluationInput {
  return {
    hook: 'patient-view',
    hookInstance: crypto.randomUUID(),
    now: new Date('2024-02-29T10:15:00.000Z'),
    context: { userId: 'Practitioner/1', patientId: 'p1' },
    prefetch: { patient: { resourceType: 'Patient', id: 'p1', gender: 'female' } },
  };
}

describe('compiling a pack in slices', () => {
  it('hashes piece by piece to exactly packHash', () => {
    const shipped = shippedPackRaw() as RulePack;
    const odd = {
      ...freshPack(),
      tests: undefined,
      extra: [undefined, () => 1, { b: 1, a: [2, undefined] }],
      gone: () => 1,
    } as unknown as RulePack;
    for (const p of [shipped, freshPack(), odd]) {
      expect(runSteps(packHashSteps(p))).to.equal(packHash(p));
    }
  });

  it('gives compilePack’s hash and program, frozen in place, letting the event loop run meanwhile', async () => {
    const raw = structuredClone(shippedPackRaw()) as RulePack;
    raw.version = `9.9.9-slices.${crypto.randomBytes(3).toString('hex')}`;
    const own = structuredClone(raw);
    let ticks = 0;
    const timer = setInterval(() => {
      ticks++;
    }, 0);
    const before = threadCompileCounts();
    let compiled: CompiledPack;
    try {
      compiled = await compilePackInSlices(own);
    } finally {
      clearInterval(timer);
    }
    const after = threadCompileCounts();
    expect(after.sliced - before.sliced).to.equal(1);
    expect(after.blocking - before.blocking).to.equal(0);
    expect(ticks, 'timers ran while it compiled').to.be.above(0);
    expect(compiled.hash).to.equal(packHash(raw));
    expect(compiled.pack).to.equal(own);
    expect(Object.isFrozen(own.rules[0])).to.equal(true);
    // Cached by hash: compilePack of the same content is the same object, compiled once.
    expect(compilePack(raw)).to.equal(compiled);
    expect(await compilePackInSlices(structuredClone(raw))).to.equal(compiled);
    expect(threadCompileCounts()).to.deep.equal(after);
  });

  it('fails like compilePack for an expression that does not compile', async () => {
    const bad = freshPack('%patient.gender = ');
    expect(() => compilePack(structuredClone(bad))).to.throw(PackValidationError);
    let caught: unknown;
    await compilePackInSlices(bad).catch((err: unknown) => {
      caught = err;
    });
    expect(caught).to.be.instanceOf(PackValidationError);
  });
});

describe('the evaluator never compiles a pack in one block in the calling thread', () => {
  it('sends a call for a pack not compiled here to a worker, compiles it here in slices, then runs later calls here', async () => {
    const ev = createEvaluator({ workers: 1, inlineSliceMs: 1000 });
    try {
      await ev.ready();
      const p = deepFreeze(freshPack());
      // As a pack checked in a worker arrives: hashed, not compiled in this thread.
      const pack: CompiledPack = { id: p.id, version: p.version, hash: packHash(p), pack: p };
      const before = threadCompileCounts();
      const first = await ev.evaluate(pack, 'svc', input());
      expect(threadCompileCounts().blocking).to.equal(before.blocking);
      expect(ev.stats()).to.include({ calls: 1, inline: 0 });
      const deadline = Date.now() + 20_000;
      while (ev.stats().compiledAside !== 1) {
        expect(Date.now(), 'not compiled aside').to.be.below(deadline);
        await new Promise((resolve) => setTimeout(resolve, 10));
      }
      const second = await ev.evaluate(pack, 'svc', input());
      expect(ev.stats()).to.include({ calls: 2, inline: 1, compiledAside: 1 });
      expect(threadCompileCounts().blocking).to.equal(before.blocking);
      expect(second.cards).to.deep.equal(first.cards);
      expect(first.cards.map((c) => c.summary)).to.deep.equal(['card p1', 'second']);
    } finally {
      await ev.close();
    }
  });

  it('does not try again, in this thread, a pack that does not compile: its calls go to a worker, which reports it', async () => {
    const ev = createEvaluator({ workers: 1, inlineSliceMs: 1000 });
    try {
      await ev.ready();
      const p = deepFreeze(freshPack('%patient.gender = '));
      const pack: CompiledPack = { id: p.id, version: p.version, hash: packHash(p), pack: p };
      const first = await ev.evaluate(pack, 'svc', input());
      expect(first.trace.map((t) => t.status)).to.deep.equal(['error', 'error']);
      await new Promise((resolve) => setTimeout(resolve, 200));
      const second = await ev.evaluate(pack, 'svc', input());
      expect(second.trace.map((t) => [t.status, t.error])).to.deep.equal(
        first.trace.map((t) => [t.status, t.error]),
      );
      expect(ev.stats()).to.include({ calls: 2, inline: 0, compiledAside: 0 });
    } finally {
      await ev.close();
    }
  });
});
