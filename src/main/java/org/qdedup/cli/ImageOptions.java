package org.qdedup.cli;

import java.util.LinkedHashMap;
import java.util.Map;
import org.qdedup.image.CreateOptions;

/** qemu-img's -o option list for qcow2 ("cluster_size=64k,compat=v3,..."), turned into create options. */
final class ImageOptions {
    private ImageOptions() {
    }

    /** Parsed -o values, in order; "help" and unknown keys are errors. */
    static Map<String, String> parse(String spec) {
        Map<String, String> m = new LinkedHashMap<>();
        if (spec == null || spec.isEmpty()) {
            return m;
        }
        // qemu allows ",," for a literal comma inside a value.
        StringBuilder cur = new StringBuilder();
        for (int i = 0; i < spec.length(); i++) {
            char c = spec.charAt(i);
            if (c == ',' && i + 1 < spec.length() && spec.charAt(i + 1) == ',') {
                cur.append(',');
                i++;
            } else if (c == ',') {
                put(m, cur.toString());
                cur.setLength(0);
            } else {
                cur.append(c);
            }
        }
        put(m, cur.toString());
        return m;
    }

    private static void put(Map<String, String> m, String kv) {
        if (kv.isEmpty()) {
            return;
        }
        int eq = kv.indexOf('=');
        if (eq < 0) {
            throw new CliException("invalid option '" + kv + "' in -o (expected key=value)");
        }
        m.put(kv.substring(0, eq), kv.substring(eq + 1));
    }

    static boolean onOff(String key, String v) {
        return switch (v) {
            case "on", "true", "yes" -> true;
            case "off", "false", "no" -> false;
            default -> throw new CliException("parameter '" + key + "' expects 'on' or 'off', not '" + v + "'");
        };
    }

    /** Result of applying -o: the create options plus settings that are not part of the format. */
    record Applied(CreateOptions create, String preallocation, Boolean dedup, Integer dedupHeadroom) {
    }

    /** -o dedup_headroom means nothing without dedup: refused before anything is created. */
    static void checkHeadroom(Applied a, boolean wantDedup) {
        if (!wantDedup && a.dedupHeadroom() != null) {
            throw new CliException("dedup_headroom needs dedup (--dedup or -o dedup=on)");
        }
    }

    /** Enables dedup on a newly created image, saying so where 1-bit refcounts leave nothing to share. */
    static void enableDedup(String image, CreateOptions o, Integer headroom) throws java.io.IOException {
        if (o.refcountOrder() == 0) {
            Context.err().println("qdedup: " + image + ": refcount_bits=1 cannot count a second reference: dedup "
                    + "shares nothing here, it only skips zero and unchanged clusters");
        }
        org.qdedup.image.ImageOps.enableDedup(image, headroom);
    }

    static Applied apply(Map<String, String> opts, CreateOptions base) {
        CreateOptions o = base;
        String prealloc = "off";
        Boolean dedup = null;
        Integer headroom = null;
        String dataFile = null;
        Boolean dataFileRaw = null;
        for (Map.Entry<String, String> e : opts.entrySet()) {
            String k = e.getKey(), v = e.getValue();
            switch (k) {
                case "cluster_size" -> {
                    long cs;
                    try {
                        cs = Sizes.parse(v);
                    } catch (IllegalArgumentException ex) {
                        throw new CliException("cluster_size: " + ex.getMessage());
                    }
                    if (Long.bitCount(cs) != 1 || cs < 512 || cs > (2 << 20)) {
                        throw new CliException("Cluster size must be a power of two between 512 and 2048k");
                    }
                    o = o.withClusterBits(Long.numberOfTrailingZeros(cs));
                }
                case "compat" -> o = o.withVersion(switch (v) {
                    case "0.10", "v2" -> 2;
                    case "1.1", "v3" -> 3;
                    default -> throw new CliException("Invalid parameter '" + v + "' for compat (expected 0.10, v2, 1.1 or v3)");
                });
                case "refcount_bits" -> {
                    int bits;
                    try {
                        bits = Integer.parseInt(v);
                    } catch (NumberFormatException ex) {
                        throw new CliException("refcount_bits must be a number, not '" + v + "'");
                    }
                    if (Integer.bitCount(bits) != 1 || bits > 64) {
                        throw new CliException("Refcount width must be a power of two and may not exceed 64 bits");
                    }
                    o = o.withRefcountOrder(Integer.numberOfTrailingZeros(bits));
                }
                case "extended_l2" -> o = o.withExtendedL2(onOff(k, v));
                case "lazy_refcounts" -> o = o.withLazyRefcounts(onOff(k, v));
                case "compression_type" -> o = o.withCompressionType(switch (v) {
                    case "zlib" -> 0;
                    case "zstd" -> 1;
                    default -> throw new CliException("Invalid parameter '" + v + "' for compression_type (zlib or zstd)");
                });
                case "preallocation" -> {
                    switch (v) {
                        case "off", "metadata", "falloc", "full" -> prealloc = v;
                        default -> throw new CliException("Invalid parameter '" + v + "' for preallocation");
                    }
                }
                case "backing_file" -> o = o.withBacking(v, o.backingFormat());
                case "backing_fmt" -> o = o.withBacking(o.backingFile(), v);
                case "data_file" -> dataFile = v;
                case "data_file_raw" -> dataFileRaw = onOff(k, v);
                case "dedup" -> dedup = onOff(k, v);
                case "dedup_headroom" -> {
                    try {
                        headroom = Integer.parseInt(v);
                    } catch (NumberFormatException ex) {
                        headroom = -1;
                    }
                    if (headroom < 0 || headroom > org.qdedup.format.Header.MAX_DEDUP_HEADROOM) {
                        throw new CliException("dedup_headroom must be a number of snapshots in 0.."
                                + org.qdedup.format.Header.MAX_DEDUP_HEADROOM + ", not '" + v + "'");
                    }
                }
                case "size" -> {
                    try {
                        o = o.withSize(Sizes.parse(v));
                    } catch (IllegalArgumentException ex) {
                        throw new CliException("size: " + ex.getMessage());
                    }
                }
                case "encryption", "encrypt.format", "encrypt.key-secret" ->
                        throw new CliException("encrypted images are not supported");
                default -> throw new CliException("Invalid parameter '" + k + "' for qcow2 (see qdedup create --help)");
            }
        }
        if (dataFile != null || dataFileRaw != null) {
            o = o.withDataFile(dataFile, dataFileRaw != null && dataFileRaw);
        }
        return new Applied(o, prealloc, dedup, headroom);
    }
}
