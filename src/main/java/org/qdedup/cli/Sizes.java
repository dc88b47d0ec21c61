package org.qdedup.cli;

import java.math.BigDecimal;
import java.math.MathContext;

/** Size arguments with qemu-img's suffixes, and QEMU's size_to_str for human output. */
public final class Sizes {
    private Sizes() {
    }

    /** Parses "512", "4k", "64K", "1M", "2G", "1T", "1P", "1E" (powers of 1024; "b" = bytes). */
    public static long parse(String s) {
        String t = s.trim();
        if (t.isEmpty()) {
            throw new IllegalArgumentException("empty size");
        }
        char last = Character.toLowerCase(t.charAt(t.length() - 1));
        int shift = switch (last) {
            case 'b' -> 0;
            case 'k' -> 10;
            case 'm' -> 20;
            case 'g' -> 30;
            case 't' -> 40;
            case 'p' -> 50;
            case 'e' -> 60;
            default -> -1;
        };
        String num = shift >= 0 ? t.substring(0, t.length() - 1) : t;
        if (shift < 0) {
            shift = 0;
        }
        BigDecimal v;
        try {
            v = new BigDecimal(num);
        } catch (NumberFormatException e) {
            throw new IllegalArgumentException("invalid size '" + s + "' (expected a number with an optional k, M, G, T suffix)");
        }
        BigDecimal bytes = v.multiply(BigDecimal.valueOf(2).pow(shift));
        if (bytes.signum() < 0 || bytes.compareTo(BigDecimal.valueOf(Long.MAX_VALUE)) > 0) {
            throw new IllegalArgumentException("size '" + s + "' out of range");
        }
        try {
            return bytes.longValueExact();
        } catch (ArithmeticException e) {
            throw new IllegalArgumentException("size '" + s + "' is not a whole number of bytes");
        }
    }

    private static final String[] SUFFIXES = {"", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"};

    /** QEMU's size_to_str: three significant digits and a binary unit, e.g. "332 KiB", "1.5 MiB", "0 B". */
    public static String human(long val) {
        int exp = val == 0 ? 0 : Math.getExponent(val / (1000.0 / 1024.0)) + 1;
        int i = (exp - 1) / 10;
        if (i < 0) {
            i = 0;
        }
        double d = (double) val / (1L << (i * 10));
        return g3(d) + " " + SUFFIXES[i] + "B";
    }

    /** C's "%0.3g" for 0 <= d < 1000. */
    static String g3(double d) {
        if (d == 0) {
            return "0";
        }
        BigDecimal b = new BigDecimal(d).round(new MathContext(3, java.math.RoundingMode.HALF_EVEN));
        b = b.stripTrailingZeros();
        return b.toPlainString();
    }
}
