/**
 * Plain-text tables for the CLI: columns padded to their widest cell, two spaces apart, no
 * trailing spaces. Left-aligned, except the columns named in `right` (numbers).
 */
export function textTable(
  header: readonly string[],
  rows: ReadonlyArray<readonly string[]>,
  opts: { right?: ReadonlySet<number> } = {},
): string[] {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]?.length ?? 0)));
  return [header, ...rows].map((r) =>
    r
      .map((cell, i) =>
        opts.right?.has(i) === true ? cell.padStart(widths[i] ?? 0) : cell.padEnd(widths[i] ?? 0),
      )
      .join('  ')
      .trimEnd(),
  );
}
