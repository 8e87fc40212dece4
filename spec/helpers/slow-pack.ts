/**
 * Packs whose rules are slow by design (and the same each call), for the live-budget specs.
 */
import type { RulePack } from '../../rules/index.ts';

const CARD = { summary: 's', indicator: 'info', source: { label: 'x' } } as const;
const REQUEST = { hook: 'patient-view', context: { patientId: 'p', userId: 'Practitioner/u' } };

/**
 * A rule that walks 30^4 = 810,000 items built from the call's input (so nothing is computed
 * once for all calls or shared between rules): about 50 ms on an idle 2-core machine, several
 * times that on a loaded one, far from the 500 ms rule budget either way.
 */
export function slowRule(k: number): RulePack['rules'][number] {
  return {
    id: `slow-${k}`,
    title: `Slow check ${k}`,
    service: 'svc',
    when: `(%context.patientId + '${k}')${'.select(%x)'.repeat(4)}.where($this = 'none').exists()`,
    card: CARD,
  };
}

/** `slow` slow rules and one quick rule, with `tests` tests that all pass. */
export function slowPack(slow: number, tests = 2, id = 'live-budget'): RulePack {
  return {
    id,
    version: '1.0.0',
    title: 't',
    publisher: 'p',
    description: 'd',
    services: [{ id: 'svc', hook: 'patient-view', description: 'd' }],
    let: { x: Array.from({ length: 30 }, (_, i) => `'v${i}'`).join(' | ') },
    rules: [
      {
        id: 'quick',
        title: 'Quick check',
        service: 'svc',
        when: "%context.patientId = 'p'",
        card: CARD,
      },
      ...Array.from({ length: slow }, (_, i) => slowRule(i + 1)),
    ],
    tests: Array.from({ length: tests }, (_, i) => ({
      name: `case ${i + 1}`,
      service: 'svc',
      now: '2021-03-01T12:00:00Z',
      request: REQUEST,
      expect: {
        fire: ['quick'],
        ...(slow > 0 ? { notFire: Array.from({ length: slow }, (_, k) => `slow-${k + 1}`) } : {}),
      },
    })),
  };
}
