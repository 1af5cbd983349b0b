package org.fhirdicomweb.hapitest;

import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.DefaultProfileValidationSupport;
import ca.uhn.fhir.validation.FhirValidator;
import ca.uhn.fhir.validation.SingleValidationMessage;
import ca.uhn.fhir.validation.ValidationResult;
import com.fasterxml.jackson.databind.ObjectMapper;
import com.fasterxml.jackson.databind.node.ArrayNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.BufferedReader;
import java.io.BufferedWriter;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import org.hl7.fhir.common.hapi.validation.support.CommonCodeSystemsTerminologyService;
import org.hl7.fhir.common.hapi.validation.support.InMemoryTerminologyServerValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.SnapshotGeneratingValidationSupport;
import org.hl7.fhir.common.hapi.validation.support.ValidationSupportChain;
import org.hl7.fhir.common.hapi.validation.validator.FhirInstanceValidator;

/**
 * HAPI's FHIR instance validator (base R4: the official structure definitions, value sets and code
 * systems of hapi-fhir-validation-resources-r4, no terminology server) over a batch of resources,
 * so the tests pay for one JVM and one validator set-up however many resources they check.
 *
 * <p>Input: a file of resources, one JSON resource a line. Output, into the second file named (the
 * JVM's own log lines go to standard output): one JSON object a line per input line, in order: {@code {"index", "resourceType", "id", "issues": [{
 * "severity", "location", "message", "messageId"}]}} with every message of the validator
 * (information included, so the caller decides what to count). Run from the server's jar with
 * {@code java -Dloader.main=org.fhirdicomweb.hapitest.ValidateResources -cp hapi-test-server.jar
 * org.springframework.boot.loader.launch.PropertiesLauncher IN OUT}; Spring is never started.
 */
public final class ValidateResources {

	private ValidateResources() {}

	public static void main(String[] args) throws IOException {
		if (args.length != 2) {
			System.err.println("usage: ValidateResources IN OUT (one JSON resource a line in, one result a line out)");
			System.exit(2);
		}
		FhirContext context = FhirContext.forR4();
		ValidationSupportChain support = new ValidationSupportChain(
				new DefaultProfileValidationSupport(context),
				new CommonCodeSystemsTerminologyService(context),
				new InMemoryTerminologyServerValidationSupport(context),
				new SnapshotGeneratingValidationSupport(context));
		FhirValidator validator = context.newValidator();
		validator.registerValidatorModule(new FhirInstanceValidator(support));

		ObjectMapper json = new ObjectMapper();
		try (BufferedReader in = Files.newBufferedReader(Path.of(args[0]), StandardCharsets.UTF_8);
				BufferedWriter out = Files.newBufferedWriter(Path.of(args[1]), StandardCharsets.UTF_8)) {
			String line;
			int index = 0;
			while ((line = in.readLine()) != null) {
				if (line.isBlank()) {
					continue;
				}
				ObjectNode answer = json.createObjectNode();
				answer.put("index", index++);
				ArrayNode issues = answer.putArray("issues");
				try {
					ObjectNode resource = (ObjectNode) json.readTree(line);
					answer.put("resourceType", resource.path("resourceType").asText());
					answer.put("id", resource.path("id").asText());
					ValidationResult result = validator.validateWithResult(line);
					for (SingleValidationMessage message : result.getMessages()) {
						ObjectNode issue = issues.addObject();
						issue.put("severity", message.getSeverity().getCode());
						issue.put("location", message.getLocationString());
						issue.put("message", message.getMessage());
						issue.put("messageId", message.getMessageId());
					}
				} catch (RuntimeException e) {
					// A resource the validator cannot even read is an error of that resource, not the end.
					ObjectNode issue = issues.addObject();
					issue.put("severity", "fatal");
					issue.put("location", "");
					issue.put("message", String.valueOf(e.getMessage()));
					issue.put("messageId", e.getClass().getSimpleName());
				}
				out.write(json.writeValueAsString(answer));
				out.newLine();
			}
		}
	}
}
