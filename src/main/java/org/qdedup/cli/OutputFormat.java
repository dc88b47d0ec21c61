package org.qdedup.cli;

/** --output=human|json. */
final class OutputFormat {
    private OutputFormat() {
    }

    static boolean json(String value) {
        return switch (value) {
            case "json" -> true;
            case "human" -> false;
            default -> throw new CliException("--output must be 'human' or 'json', not '" + value + "'");
        };
    }
}
