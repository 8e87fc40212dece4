/**
 * A generated pack of `rules` rules on one patient-view service: valid, no tests, each rule
 * with its own expression and a card with static detail, links and override reasons. Costly to
 * validate and compile in bulk: a few seconds for 3,000 rules (1.4 MB of JSON) in a fresh thread.
 * At most 3,000 rules: their expressions then total just under the 65,536-character limit.
 */
export function generatedPack(id: string, rules: number): Record<string, unknown> {
  if (rules > 3000) {
    throw new RangeError('at most 3000 generated rules (the pack expression size limit)');
  }
  return {
    id,
    version: '1.0.0',
    title: `Generated pack ${id}`,
    publisher: 'cellcds specs',
    description: `${rules} generated rules.`,
    services: [{ id: `${id}-svc`, hook: 'patient-view', description: 'Generated rules.' }],
    rules: Array.from({ length: rules }, (_, i) => ({
      id: `rule-${i}`,
      service: `${id}-svc`,
      when: `%patient.id = 'p${i}'`,
      card: {
        summary: `Generated rule ${i}`,
        detail: `Rule ${i} of a generated pack: **static** text only.`,
        indicator: 'info',
        source: { label: 'generated', url: 'https://example.org/generated' },
        links: [
          { label: `Rule ${i} reference`, url: `https://example.org/rules/${i}`, type: 'absolute' },
        ],
        overrideReasons: [
          { system: 'http://example.org/override', code: 'other', display: 'Other' },
        ],
      },
    })),
  };
}
